"""train.py under torchrun on the CPU (gloo): two processes, two "nodes" through a c10d rendezvous,
--resume, and ranks that fail or stop answering.

Each launch is a real `python -m torch.distributed.run ...`; one that outlives its deadline is
killed with every process it started. Runs whose results are compared give every rank one CPU
thread: the thread count changes the order of float sums, and the comparisons are bit-exact.
"""

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train
from conftest import split_keys, copy_shards
from model import VAELoss, VariationalAutoEncoder
from model.step import TrainStep
from pipeline.shards import epoch_order, rank_samples, split_shards, take
from run.launch import cpu_threads, usable_cores

ROOT = Path(__file__).resolve().parents[1]
PROBE = ROOT / "tests" / "torchrun_probe.py"
BATCH = 16
LAUNCH_TIMEOUT = 300  # seconds for one launch, start-up included, on a busy 2-core machine
DIST_TIMEOUT = 10  # --dist-timeout where a test waits for it
# One entry per way of feeding the model; each gets the full set of two-process checks.
# train.py's flags for each way of feeding it: the two decoding loaders streaming, and the resident cache
CASES = {"torch": ["--loader", "torch", "--cache", "off"], "dali": ["--loader", "dali", "--cache", "off"],
         "cache": ["--loader", "torch", "--cache", "on"]}
# fp32 (--amp off) everywhere, also on CPUs where auto picks bf16: the comparisons with one process below
# hold to float rounding only when both evaluate in the same precision.
# metrics.jsonl's fields that time the run rather than describe the training (compile_s, fill_s and
# fill_source only in a run's first line, quality_seconds only in its last): a resumed run's lines equal an
# uninterrupted run's but for these.
TIMINGS = ("seconds", "images_per_s", "wall_s", "eval_s", "figures_s", "checkpoint_s", "compile_s", "fill_s",
           "fill_source", "quality_seconds")
FLAGS = ["--epochs", "2", "--batch-size", str(BATCH), "--workers", "1", "--seed", "5", "--amp", "off"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *args]


def one_node(script, *flags) -> list[str]:
    return torchrun("--standalone", "--nproc-per-node", "2", str(script), *flags)


def node_of_two(port: int, *flags) -> list[str]:
    """One of two single-process "nodes" meeting at 127.0.0.1:port, as on two machines."""
    return torchrun("--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint",
                    f"127.0.0.1:{port}", "--rdzv-id", "vae-test", "--rdzv-conf", "join_timeout=60",
                    "train.py", *flags)


def process_tree(pid: int) -> list[int]:
    """pid and its descendants: torchrun starts each worker in a session of its own."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    return tree


class Launch:
    """A command and every process it starts; its output in a file. Killed whole if it overstays."""

    def __init__(self, cmd: list[str], log: Path, env: dict | None = None):
        self.log, self.started = log, time.monotonic()
        with open(log, "w") as out:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                         env=os.environ if env is None else env)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def signal(self, sig) -> None:
        if self.proc.poll() is not None:  # ended, and its workers with it: its pid may belong to another now
            return
        for pid in process_tree(self.proc.pid):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            self.proc.wait()
            pytest.fail(f"{self.log.name}: still running after {timeout:.0f} s:\n{self.output()[-3000:]}")

    def finished(self, expect_ok: bool = True, timeout: float | None = None) -> str:
        """The output, once it has ended (within `timeout` s from now, else LAUNCH_TIMEOUT from its start)."""
        rc = self.wait(timeout if timeout is not None else self.started + LAUNCH_TIMEOUT - time.monotonic())
        assert (rc == 0) == expect_ok, f"{self.log.name} exited with {rc}:\n{self.output()[-3000:]}"
        return self.output()


@pytest.fixture
def launches():
    """Launch(...) for a test; whatever is still running at its end is killed."""
    started = []

    def launch(*args, **kwargs):
        started.append(Launch(*args, **kwargs))
        return started[-1]

    yield launch
    for each in started:
        each.signal(signal.SIGKILL)
        each.proc.wait()


def without_omp() -> dict:
    """The environment without OMP_NUM_THREADS, so that torchrun applies its own default."""
    return {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def weights(path: Path) -> dict:
    return torch.load(path, map_location="cpu")


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- two processes, one machine


@pytest.fixture(scope="module")
def probed_runs(shards, tmp_path_factory):
    """case -> (output dir, probe dir, log) of a two-process run of that case, made when first asked for."""
    made = {}

    def get(case):
        if case not in made:
            folder = tmp_path_factory.mktemp(f"two-ranks-{case}")
            flags = ["--data-path", str(shards), "--output-dir", str(folder / "out"), *FLAGS, *CASES[case],
                     "--threads", "1"]
            run = Launch(one_node(PROBE, folder / "probe", *flags), folder / "log", env=without_omp())
            try:
                log = run.finished()
            finally:
                run.signal(signal.SIGKILL)
            made[case] = folder / "out", folder / "probe", log
        return made[case]

    return get


@pytest.fixture(scope="module", params=list(CASES))
def two_ranks(request, probed_runs):
    return (request.param, *probed_runs(request.param))


def passes(probe: Path, rank: int, split: str) -> list[dict]:
    records = [json.loads(line) for line in (probe / f"keys-rank{rank}.jsonl").read_text().splitlines()]
    return [r for r in records if r["split"] == split]


def test_each_epoch_the_ranks_share_the_training_split(two_ranks, shards):
    _, out, probe, log = two_ranks
    everything = set(split_keys(shards, "train"))
    steps_per_rank = len(everything) // 2 // BATCH
    assert f"{steps_per_rank} steps of {BATCH} x 2" in log
    rank0, rank1 = passes(probe, 0, "train"), passes(probe, 1, "train")
    assert [p["epoch"] for p in rank0] == [p["epoch"] for p in rank1] == [0, 1]
    orders = []
    for p0, p1 in zip(rank0, rank1):
        assert len(p0["batches"]) == len(p1["batches"]) == steps_per_rank, "DDP needs equal step counts"
        assert all(len(batch) == BATCH for batch in p0["batches"] + p1["batches"])
        keys0, keys1 = [k for b in p0["batches"] for k in b], [k for b in p1["batches"] for k in b]
        assert len(set(keys0)) == len(keys0) and len(set(keys1)) == len(keys1), "a sample twice on one rank"
        assert not set(keys0) & set(keys1), "a sample on both ranks"
        seen = set(keys0) | set(keys1)
        # Every sample once, apart from the tail that does not fill a batch on each rank.
        assert seen <= everything and len(everything - seen) == len(everything) - 2 * steps_per_rank * BATCH
        orders.append(keys0 + keys1)
    assert orders[0] != orders[1], "each epoch should shuffle anew"


def test_each_evaluation_sees_the_validation_split_once(two_ranks, shards):
    _, out, probe, log = two_ranks
    everything = split_keys(shards, "val")
    rank0, rank1 = passes(probe, 0, "val"), passes(probe, 1, "val")
    assert len(rank0) == len(rank1) == 2  # one evaluation per epoch
    for p0, p1 in zip(rank0, rank1):
        keys0, keys1 = [k for b in p0["batches"] for k in b], [k for b in p1["batches"] for k in b]
        assert not set(keys0) & set(keys1)
        assert sorted(keys0 + keys1) == sorted(everything)


def rank_state(probe: Path, rank: int, epoch: int) -> dict:
    """{"model": weights, "rng": torch RNG state} of `rank` as it began evaluating after `epoch`."""
    return torch.load(probe / f"rank{rank}-epoch{epoch}.pt")


def test_both_ranks_hold_the_same_weights(two_ranks):
    _, out, probe, log = two_ranks
    for epoch in (1, 2):
        assert same_weights(rank_state(probe, 0, epoch)["model"], rank_state(probe, 1, epoch)["model"])
    final = weights(out / "vae_celeba.pth")
    assert same_weights(final, rank_state(probe, 1, 2)["model"])
    assert not same_weights(final, rank_state(probe, 1, 1)["model"]), "the second epoch trained nothing"


def test_rank_zero_alone_writes_the_outputs(two_ranks):
    case, out, probe, log = two_ranks
    assert sorted(p.name for p in out.iterdir()) == [
        "attributes.png", "checkpoint.prev.pt", "checkpoint.pt", "curves.png", "generated_samples.png",
        "generated_samples_gmm.png", "interpolations.png", "metrics.jsonl", "reconstructions_epoch1.png",
        "reconstructions_epoch2.png", "run.json", "vae_celeba.attributes.pt", "vae_celeba.gmm.pt", "vae_celeba.pth"]
    assert [row["epoch"] for row in metrics(out)] == [1, 2]  # one line per epoch, not one per rank
    # the run's last line, "wrote ...", once (the cache's "; wrote .../decoded-*.u8" notes are not it)
    assert sum(line.startswith("wrote ") for line in log.splitlines()) == 1 and log.count("epoch 2: train loss") == 1
    first = next(line for line in log.splitlines() if line.startswith("device "))
    assert "| 2 processes (gloo), CPU threads 1 per process" in first
    loader = next(line for line in log.splitlines() if " loader: " in line)
    assert loader.startswith(f"{CASES[case][1]} loader: ")


def test_each_rank_draws_its_own_noise_and_the_checkpoint_keeps_every_ranks_state(two_ranks):
    _, out, probe, log = two_ranks
    assert not torch.equal(rank_state(probe, 0, 1)["rng"], rank_state(probe, 1, 1)["rng"])
    state = torch.load(probe / "checkpoint-epoch1.pt")  # weights_only: tensors and plain values
    assert [sorted(rng) for rng in state["rng"]] == [["cuda", "torch"]] * 2
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])


def evaluation(case: str, shards: Path, out: Path):
    """(args, model with out's saved weights, TrainStep) to evaluate as train.py does, in this process."""
    args = train.parse_args(["--data-path", str(shards), *FLAGS, *CASES[case]])
    model = VariationalAutoEncoder(z_dim=args.z_dim).to(memory_format=torch.channels_last)
    model.load_state_dict(weights(out / "vae_celeba.pth"))
    return args, model, TrainStep(model, torch.optim.Adam(model.parameters()), "cpu")


def test_validation_metrics_are_the_ranks_shares_summed(two_ranks, shards):
    """Each rank's share of the split evaluated here, from the random state that rank had: the recorded
    metrics are their mean weighted by image counts, to float rounding."""
    case, out, probe, log = two_ranks
    args, model, step = evaluation(case, shards, out)
    sums, images = dict.fromkeys(VAELoss._fields, 0.0), 0
    for rank in (0, 1):
        _, val_loader = train.build_loaders(args, torch.device("cpu"), rank, 2)
        torch.set_rng_state(rank_state(probe, rank, 2)["rng"])
        share = train.evaluate(model, val_loader, step, args.beta)
        images += val_loader.num_samples
        for field in sums:
            sums[field] += share[field] * val_loader.num_samples
    assert images == len(split_keys(shards, "val"))
    recorded = metrics(out)[-1]
    for field in VAELoss._fields:
        assert recorded[f"val_{field}"] == pytest.approx(sums[field] / images, rel=1e-6)


def test_validation_metrics_are_those_of_one_process(two_ranks, shards):
    case, out, probe, log = two_ranks
    args, model, step = evaluation(case, shards, out)
    _, val_loader = train.build_loaders(args, torch.device("cpu"), 0, 1)
    alone = train.evaluate(model, val_loader, step, args.beta)
    recorded = metrics(out)[-1]
    # The KL term depends on the weights alone: equal but for the order of float sums.
    assert recorded["val_kl"] == pytest.approx(alone["kl"], rel=1e-5)
    # The others decode a sampled z, and which noise an image gets depends on how the split is batched:
    # over 5 seeds one process's val loss spread over 1.3e-4 of its value (measured).
    for field in ("loss", "bce", "neg_elbo"):
        assert recorded[f"val_{field}"] == pytest.approx(alone[field], rel=1e-3)


def test_resume_under_torchrun_continues_bit_identically(two_ranks, shards, tmp_path, launches):
    case, out, probe, log = two_ranks
    # The straight run's checkpoint after epoch 1 is what a run stopped there would have left.
    flags = ["--data-path", str(shards), "--output-dir", str(tmp_path / "out"), *FLAGS, *CASES[case],
             "--threads", "1", "--resume", str(probe / "checkpoint-epoch1.pt")]
    resumed_log = launches(one_node("train.py", *flags), tmp_path / "log", env=without_omp()).finished()
    assert "after epoch 1" in resumed_log
    # On a difference, what each run did before training (device, cache plan, decoded or loaded, steps).
    def setup(text):
        return [line.split("\r")[-1] for line in text.splitlines()
                if line.startswith(("device ", "cache ", "cached ", "resumed from ", f"{CASES[case][1]} loader: "))]
    setups = "\n".join(["straight run:", *setup(log), "resumed run:", *setup(resumed_log)])
    assert same_weights(weights(tmp_path / "out" / "vae_celeba.pth"), weights(out / "vae_celeba.pth")), setups
    straight, resumed = metrics(out)[-1], metrics(tmp_path / "out")[-1]
    assert {k: v for k, v in resumed.items() if k not in TIMINGS} == {
        k: v for k, v in straight.items() if k not in TIMINGS}, setups


# ----------------------------------------------------------------------------- two machines, played by one


def test_two_nodes_train_like_two_processes_on_one(probed_runs, shards, tmp_path, launches):
    out, _, _ = probed_runs("torch")
    port = free_port()
    nodes = []
    for node in (0, 1):  # each node keeps its outputs in its own folder, as on separate disks
        flags = ["--data-path", str(shards), "--output-dir", str(tmp_path / f"node{node}"), *FLAGS, *CASES["torch"]]
        # One thread each from OMP_NUM_THREADS: torchrun with one process per node leaves it as set.
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        nodes.append(launches(node_of_two(port, *flags), tmp_path / f"node{node}.log", env=env))
    logs = [node.finished() for node in nodes]
    # Global rank 0 goes to whichever node joins first: it alone prints and writes.
    (master,) = [node for node in (0, 1) if "wrote " in logs[node]]
    other = tmp_path / f"node{1 - master}"
    assert not other.exists() or not any(other.iterdir())
    assert "| 2 processes (gloo), CPU threads 1 per process" in logs[master]
    result = tmp_path / f"node{master}"
    assert [row["epoch"] for row in metrics(result)] == [1, 2]
    assert same_weights(weights(result / "vae_celeba.pth"), weights(out / "vae_celeba.pth"))


# ----------------------------------------------------------------------------- a rank that fails or hangs


def test_a_rank_that_cannot_read_its_shard_ends_the_job_with_its_error(shards, tmp_path, launches):
    data = copy_shards(shards, tmp_path / "shards")
    train_shards = split_shards(data, "train")
    order = epoch_order(train_shards, 0, seed=5, shuffle=True)
    total = sum(s.num_samples for s in train_shards)
    read = [{span.shard for span in take(order, *rank_samples(total, rank, 2, train=True))} for rank in (0, 1)]
    bad = sorted(read[1] - read[0], key=lambda s: s.tar)[0].tar  # read by rank 1 alone in epoch 1
    bad.write_bytes(random.Random(0).randbytes(bad.stat().st_size))  # same size, no tar inside
    flags = ["--data-path", str(data), "--output-dir", str(tmp_path / "out"), *FLAGS]  # --dist-timeout 300
    run = launches(one_node("train.py", *flags), tmp_path / "log", env=without_omp())
    output = run.finished(expect_ok=False)
    errors = [line for line in output.splitlines() if "error: " in line]
    assert any(f"error: shard {bad} " in line for line in errors), output[-3000:]
    # Ended by the failure, not by the 300 s collective timeout; no traceback from train.py.
    assert time.monotonic() - run.started < 150
    assert 'train.py", line' not in output
    # Without --threads, torchrun's OMP_NUM_THREADS=1 counts as unset: the cores are shared out.
    assert f"CPU threads {max(1, usable_cores() // 2)} per process" in output


def test_a_node_that_stops_answering_ends_the_job_after_the_timeout(shards, tmp_path, launches):
    port = free_port()
    nodes = []
    for node in (0, 1):
        flags = ["--data-path", str(shards), "--output-dir", str(tmp_path / f"node{node}"), *FLAGS, "--epochs", "100",
                 "--threads", "1", "--dist-timeout", str(DIST_TIMEOUT)]
        nodes.append(launches(node_of_two(port, *flags), tmp_path / f"node{node}.log"))
        # Node 1 will freeze, so node 0 must host the rendezvous store (the first to bind the port does):
        # a frozen host would hold up node 0's launcher after its rank has ended.
        while node == 0 and not listening(port):
            assert nodes[0].proc.poll() is None and time.monotonic() - nodes[0].started < 60, nodes[0].output()
            time.sleep(0.1)
    deadline = time.monotonic() + LAUNCH_TIMEOUT
    while not any("epoch 1/100" in node.output() for node in nodes):  # training has begun
        assert time.monotonic() < deadline and all(node.proc.poll() is None for node in nodes), (
            nodes[0].output()[-2000:] + nodes[1].output()[-2000:])
        time.sleep(0.2)
    nodes[1].signal(signal.SIGSTOP)  # a frozen machine: its processes hold their connections and say nothing
    frozen = time.monotonic()
    output = nodes[0].finished(expect_ok=False, timeout=DIST_TIMEOUT + 60)
    waited = time.monotonic() - frozen
    assert DIST_TIMEOUT * 0.8 < waited < DIST_TIMEOUT + 60
    (line,) = [line for line in output.splitlines() if "error: " in line]
    assert re.search(r"error: rank [01] lost the other ranks \(Timed out .*--dist-timeout", line), line
    assert 'train.py", line' not in output


def test_thread_count_per_rank():
    cores = usable_cores()
    assert cpu_threads(3, 2, {}) == 3  # --threads wins
    assert cpu_threads(None, 1, {}) is None  # one process: torch's default, every core
    assert cpu_threads(None, 1, {"OMP_NUM_THREADS": "1"}) is None  # set by the user: torch honours it
    assert cpu_threads(None, 2, {"OMP_NUM_THREADS": "3"}) is None
    assert cpu_threads(None, 2, {"OMP_NUM_THREADS": "1"}) == max(1, cores // 2)  # torchrun's default
    assert cpu_threads(None, 2, {}) == max(1, cores // 2)
    assert cpu_threads(None, 4 * cores, {}) == 1


def test_help_explains_the_distributed_flags(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--threads THREADS CPU threads per process" in text and "torchrun's own OMP_NUM_THREADS=1" in text
    assert "--dist-timeout DIST_TIMEOUT under torchrun: seconds a rank waits" in text and "(default: 300" in text
