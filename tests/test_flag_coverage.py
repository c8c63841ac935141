"""Every flag of train.py, prep/shard.py and generate.py has a test that shows what it changes.

The convention: a test that shows a flag's effect, with a value at which a plausible wrong
implementation gives another answer (or, for a flag that must change no result, that the result is
the same), carries

    @pytest.mark.flag_effect("train.py", "--the-flag")

naming the script as in PARSERS and one of the flag's option strings (the long one by preference;
`--no-flip` counts for `--flip`, `-b` for `--batch-size`). The flags are read from the scripts'
parsers when this runs, so a flag added to a parser without such a test fails here. A flag that
changes no result at all (the help, where outputs go, progress bars, timeouts, thread counts) is
listed in EXEMPT with the reason instead.

The marks are read from the test files' syntax trees: decorators of test functions and classes
(pytest.param(..., marks=...) inside a parametrize included) and `pytestmark` assignments, whose
arguments must be string literals.
"""

import argparse
import ast
from pathlib import Path

import pytest

import generate
import train
from prep import shard

TESTS = Path(__file__).resolve().parent
PARSERS = {"train.py": train.build_parser, "prep/shard.py": shard.build_parser, "generate.py": generate.build_parser}

# (script, flag) -> why no test of its effect is needed: it changes no result. Each says what would catch a
# wrong implementation anyway, where something does.
EXEMPT = {
    ("train.py", "--help"): "prints the help and exits; test_help_explains_every_flag reads what it prints",
    ("train.py", "--output-dir"): "where the outputs go, not what they hold; every train.py test reads its "
                                  "outputs from the folder it names",
    ("train.py", "--threads"): "how many CPU threads compute the same operations: speed, not results; "
                               "test_thread_count_per_rank checks the count each process gets",
    ("train.py", "--dist-timeout"): "how long a rank waits for the others before the job stops; "
                                    "test_a_node_that_stops_answering_ends_the_job_after_the_timeout sets it",
    ("prep/shard.py", "--help"): "prints the help and exits",
    ("prep/shard.py", "--output-dir"): "where the shards go, not what they hold; every prep/shard.py test "
                                       "reads its shards from the folder it names",
    ("prep/shard.py", "--quiet"): "hides the progress bars; the tests run with it and check the shards",
    ("generate.py", "--help"): "prints the help and exits",
}


def parser_flags(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Every option string of `parser` -> the flag it belongs to: its first long option string (a
    positional argument is its dest)."""
    names = {}
    for action in parser._actions:
        if not action.option_strings:
            names[action.dest] = action.dest
            continue
        flag = next((o for o in action.option_strings if o.startswith("--")), action.option_strings[0])
        names.update(dict.fromkeys(action.option_strings, flag))
    return names


def is_flag_effect(func: ast.expr) -> bool:
    """`pytest.mark.flag_effect` or `mark.flag_effect`."""
    return (isinstance(func, ast.Attribute) and func.attr == "flag_effect"
            and isinstance(func.value, ast.Attribute) and func.value.attr == "mark")


def read_marks(source: str, filename: str) -> tuple[list[tuple[str, str, str]], list[str]]:
    """([(script, flag, where)] of the flag_effect marks on tests in `source`, [problems]): a mark whose
    arguments are not two string literals, or a mark that is on no test, is a problem."""
    tree = ast.parse(source, filename)
    on_tests = []  # the calls that mark tests
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test"):
            on_tests += [(node.name, d) for d in node.decorator_list]
        elif isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
            on_tests += [(node.name, d) for d in node.decorator_list]
        elif isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "pytestmark"
                                                  for t in node.targets):
            on_tests.append(("pytestmark", node.value))
    marks, problems, counted = [], [], set()
    for test, expression in on_tests:
        for call in ast.walk(expression):
            if not (isinstance(call, ast.Call) and is_flag_effect(call.func)):
                continue
            counted.add(id(call))
            where = f"{filename}:{call.lineno} ({test})"
            if call.keywords or len(call.args) != 2 or not all(
                    isinstance(a, ast.Constant) and isinstance(a.value, str) for a in call.args):
                problems.append(f"{where}: flag_effect takes two string literals, the script and the flag, "
                                f"as in @pytest.mark.flag_effect(\"train.py\", \"--beta\")")
                continue
            marks.append((call.args[0].value, call.args[1].value, where))
    for call in ast.walk(tree):
        if isinstance(call, ast.Call) and is_flag_effect(call.func) and id(call) not in counted:
            problems.append(f"{filename}:{call.lineno}: a flag_effect mark that is on no test (it counts as a "
                            f"decorator of a test function or class, or in pytestmark)")
    return marks, problems


def coverage_problems(parsers: dict[str, argparse.ArgumentParser], sources: dict[str, str],
                      exempt: dict[tuple[str, str], str]) -> list[str]:
    """What is wrong with the flag-effect marks of `sources` (file name -> text) against `parsers`:
    flags with neither a marked test nor an exemption, marks and exemptions naming no flag, exemptions
    without a reason or of flags that have a test."""
    flags = {script: parser_flags(p) for script, p in parsers.items()}
    marked, problems = {}, []
    for filename, source in sorted(sources.items()):
        found, bad = read_marks(source, filename)
        problems += bad
        for script, flag, where in found:
            if script not in flags:
                problems.append(f"{where}: flag_effect({script!r}, {flag!r}) names no script; the scripts are "
                                f"{', '.join(map(repr, flags))}")
            elif flag not in flags[script]:
                problems.append(f"{where}: flag_effect({script!r}, {flag!r}): {script} has no flag {flag} "
                                f"(a stale mark: remove it, or name the flag as the parser spells it)")
            else:
                marked.setdefault((script, flags[script][flag]), []).append(where)
    for (script, flag), reason in sorted(exempt.items()):
        if script not in flags or flag not in flags[script]:
            problems.append(f"EXEMPT names {script} {flag}, which no parser has: remove the entry")
        elif flags[script][flag] in {f for s, f in marked if s == script}:
            problems.append(f"EXEMPT lists {script} {flag}, which has a test of its effect "
                            f"({marked[script, flags[script][flag]][0]}): remove the entry")
        elif not reason.strip():
            problems.append(f"EXEMPT lists {script} {flag} without a reason")
    exempt_flags = {(s, flags[s][f]) for s, f in exempt if s in flags and f in flags[s]}
    for script, names in flags.items():
        for flag in sorted(set(names.values())):
            if (script, flag) not in marked and (script, flag) not in exempt_flags:
                problems.append(f"{script} {flag}: no test shows what it changes; add one marked "
                                f"@pytest.mark.flag_effect({script!r}, {flag!r})")
    return problems


HOW = ("A flag's test shows its effect at a value where ignoring or misapplying the flag gives another answer "
       "(or, for a flag that must change no result, that the result is the same); a flag that changes no result "
       "at all goes in EXEMPT in tests/test_flag_coverage.py, with the reason.")


def test_every_flag_has_a_test_of_its_effect_or_a_reason_it_needs_none():
    sources = {str(path.relative_to(TESTS.parent)): path.read_text() for path in sorted(TESTS.rglob("*.py"))}
    problems = coverage_problems({script: build() for script, build in PARSERS.items()}, sources, EXEMPT)
    assert not problems, "\n".join([*problems, HOW])


# ----------------------------------------------------------------------------- the check itself


def toy_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    p.add_argument("-b", "--batch-size", type=int)
    p.add_argument("--flip", action=argparse.BooleanOptionalAction)
    p.add_argument("--out")
    return p


TOY_TESTS = '''
import pytest

@pytest.mark.flag_effect("toy.py", "-b")
def test_batch():
    pass

@pytest.mark.parametrize("x", [pytest.param(1, marks=pytest.mark.flag_effect("toy.py", "--no-flip"))])
def test_flip(x):
    pass
'''


def test_the_check_passes_a_covered_parser_and_reads_every_spelling_of_a_flag():
    assert coverage_problems({"toy.py": toy_parser()}, {"t.py": TOY_TESTS},
                             {("toy.py", "--help"): "help", ("toy.py", "--out"): "a path"}) == []


def test_the_check_names_an_untested_flag_a_stale_mark_and_a_stale_exemption():
    source = TOY_TESTS.replace('"-b"', '"--batch"') + '''
@pytest.mark.flag_effect("toy.py", FLAG)
def test_not_literal():
    pass

@pytest.mark.flag_effect("other.py", "--out")
def test_other_script():
    pass

not_on_a_test = pytest.mark.flag_effect("toy.py", "--out")
'''
    problems = coverage_problems({"toy.py": toy_parser()}, {"t.py": source},
                                 {("toy.py", "--help"): "help", ("toy.py", "--out"): "a path",
                                  ("toy.py", "--gone"): "removed", ("toy.py", "--flip"): "also marked"})
    expected = [
        "has no flag --batch (a stale mark", "flag_effect takes two string literals", "names no script",
        "a flag_effect mark that is on no test", "EXEMPT names toy.py --gone, which no parser has",
        "EXEMPT lists toy.py --flip, which has a test of its effect", "toy.py --batch-size: no test shows",
    ]
    assert len(problems) == len(expected), "\n".join(problems)
    for words in expected:
        assert sum(words in line for line in problems) == 1, (words, problems)
