"""What each field of a training checkpoint must be, checked in one place before any is used.

run/checkpoint.py's digest says the bytes are as written, and anyone can compute it; state_problem says
whether what they hold is a checkpoint that write_checkpoint wrote and restore_checkpoint can put back:
every field is there, the weights have the shapes of the model of the saved --z-dim, Adam's state fits
those weights, the random states are torch's, and every saved setting has its type and range.
"""

import math

import torch

from model import VariationalAutoEncoder

FORMAT = 2
BOOLEAN_SETTINGS = ("flip", "compile")  # shown as --flag / --no-flag


def _whole(v, low: int) -> bool:
    return type(v) is int and v >= low


def _number(v) -> bool:
    return type(v) in (int, float) and math.isfinite(v)


# The saved settings that resuming uses, each with what it must be: state_problem refuses a checkpoint whose
# "args" lack one or hold anything else. "data" may be missing (a checkpoint of a train.py that did not
# record it yet).
ARG_CHECKS = {"z_dim": ("a whole number of at least 1", lambda v: _whole(v, 1)),
              "epochs": ("a whole number of at least 1", lambda v: _whole(v, 1)),
              "batch_size": ("a whole number of at least 1", lambda v: _whole(v, 1)),
              "seed": ("a whole number from 0 to 2**32-1", lambda v: _whole(v, 0) and v < 2**32),
              "lr": ("a finite number above 0", lambda v: _number(v) and v > 0),
              "beta": ("a finite number of at least 0", lambda v: _number(v) and v >= 0),
              **{k: ("true or false", lambda v: type(v) is bool) for k in BOOLEAN_SETTINGS},
              **{k: ("a string", lambda v: type(v) is str) for k in ("crop", "loader", "amp", "cache")}}
SCALER_KEYS = {"scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker"}  # GradScaler's
# Adam's param-group settings: the numbers it needs, then its switches (True, False or None), which a torch
# that lacks one sets to its default. A table, not a fresh Adam to compare with: making one costs a second.
ADAM_NUMBERS, ADAM_SWITCHES = ("lr", "betas", "eps", "weight_decay"), \
    ("amsgrad", "maximize", "foreach", "capturable", "differentiable", "fused", "decoupled_weight_decay")


def _shape(t) -> str:
    return str(tuple(t.shape))


def _tensor_problem(field: str, value, like: torch.Tensor, nonnegative: bool = False) -> str | None:
    """What makes `value` no stand-in for `like` (a tensor of the same shape, floating, finite), or None."""
    if not isinstance(value, torch.Tensor):
        return f"{field} is a {type(value).__name__}, not a tensor"
    if tuple(value.shape) != tuple(like.shape) or not value.is_floating_point():
        return f"{field} is a {value.dtype} tensor of shape {_shape(value)}, not a float tensor of shape {_shape(like)}"
    if not bool(torch.isfinite(value).all()) or (nonnegative and bool((value < 0).any())):
        return f"{field} holds {'negative or ' if nonnegative else ''}infinite or NaN values"
    return None


def _rng_problem(rng, world_size: int) -> str | None:
    if not isinstance(rng, list) or len(rng) != world_size:
        return f"'rng' is not a list of {world_size} random states (one per rank, world_size {world_size})"
    size = torch.get_rng_state().shape
    for rank, entry in enumerate(rng):
        field = f"rng[{rank}]"
        if not isinstance(entry, dict) or set(entry) != {"torch", "cuda"}:
            return f"{field} is not a table of 'torch' and 'cuda' states"
        cpu, cuda = entry["torch"], entry["cuda"]
        if not (isinstance(cpu, torch.Tensor) and cpu.dtype == torch.uint8 and cpu.shape == size):
            return f"{field}['torch'] is not a uint8 tensor of shape ({size[0]},), torch's random state"
        if cuda is not None and not (isinstance(cuda, torch.Tensor) and cuda.dtype == torch.uint8 and cuda.dim() == 1):
            return f"{field}['cuda'] is neither None nor a uint8 tensor, a CUDA random state"
    return None


def _optimizer_problem(optimizer, params: list[torch.Tensor]) -> str | None:
    """What makes `optimizer` no Adam state of `params`, or None."""
    if not (isinstance(optimizer, dict) and isinstance(optimizer.get("state"), dict)
            and isinstance(optimizer.get("param_groups"), list) and optimizer["param_groups"]
            and all(isinstance(g, dict) for g in optimizer["param_groups"])):
        return "'optimizer' is not an optimizer state (a 'state' table and a list of 'param_groups')"
    indices = [i for group in optimizer["param_groups"] for i in (group.get("params") or [None])]
    if indices != list(range(len(params))):
        return f"optimizer['param_groups'] list the parameters {indices}, not the model's 0 to {len(params) - 1}"
    for g, group in enumerate(optimizer["param_groups"]):
        for key in ADAM_NUMBERS + tuple(k for k in ADAM_SWITCHES if k in group):
            value = group.get(key, "missing")
            if key == "betas":
                fits = isinstance(value, (tuple, list)) and len(value) == 2 and all(_number(b) and 0 <= b < 1
                                                                                     for b in value)
            elif key in ADAM_SWITCHES:
                fits = value is None or type(value) is bool
            else:
                fits = _number(value) and value >= 0
            if not fits:
                return f"optimizer['param_groups'][{g}]['{key}'] is {value!r}, not a value Adam takes"
    for index, entry in optimizer["state"].items():
        if type(index) is not int or not 0 <= index < len(params):
            return f"optimizer['state'] has an entry {index!r} for no parameter of the model"
        field = f"optimizer['state'][{index}]"
        if not (isinstance(entry, dict) and {"step", "exp_avg", "exp_avg_sq"} <= entry.keys()):
            return f"{field} is not Adam's state of a parameter ('step', 'exp_avg', 'exp_avg_sq')"
        step = entry["step"]
        if not ((isinstance(step, torch.Tensor) and step.numel() == 1 and step.is_floating_point()
                 and math.isfinite(step.item()) and step.item() >= 0) or (_number(step) and step >= 0)):
            return f"{field}['step'] is {step!r}, not a count of steps"
        for key in ("exp_avg", "exp_avg_sq"):
            problem = _tensor_problem(f"{field}['{key}']", entry[key], params[index], key == "exp_avg_sq")
            if problem:
                return problem
    return None


def state_problem(state) -> str | None:
    """What makes `state` something other than a checkpoint that write_checkpoint wrote and restore_checkpoint
    can put back, naming the field; None when it is one. The digest only says the bytes are as written, and
    anyone can compute it: every field is checked here, the one place, before any is used (shapes against
    the model its own --z-dim makes, Adam's state against that model's parameters, types and ranges)."""
    keys = ("format", "model", "optimizer", "scaler", "epoch", "args", "world_size", "rng")
    if not isinstance(state, dict):
        return f"it holds a {type(state).__name__}, not a table of fields"
    missing = [key for key in keys if key not in state]
    if missing:
        return f"it has no field {missing[0]!r}"
    if state["format"] != FORMAT:
        return f"its 'format' is {state['format']!r}, not {FORMAT}"
    args = state["args"]
    if not isinstance(args, dict):
        return f"'args' is a {type(args).__name__}, not a table of settings"
    for key, (what, fits) in ARG_CHECKS.items():
        if key not in args:
            return f"'args' has no {key!r}"
        if not fits(args[key]):
            return f"args[{key!r}] is {args[key]!r}, not {what}"
    if "data" in args and type(args["data"]) is not str:
        return f"args['data'] is {args['data']!r}, not the shards' identity (a string)"
    if not _whole(state["epoch"], 1) or state["epoch"] > args["epochs"]:
        return f"'epoch' is {state['epoch']!r}, not a count of finished epochs from 1 to its --epochs {args['epochs']}"
    if not _whole(state["world_size"], 1):
        return f"'world_size' is {state['world_size']!r}, not a count of processes"
    problem = _rng_problem(state["rng"], state["world_size"])
    if problem:
        return problem
    scaler = state["scaler"]
    if not (scaler == {} or (isinstance(scaler, dict) and set(scaler) == SCALER_KEYS
                             and all(map(_number, scaler.values())) and scaler["scale"] > 0)):
        return "'scaler' is neither empty nor a GradScaler state (finite numbers, a scale above 0)"
    with torch.device("meta"):  # shapes only: nothing is allocated or initialised
        model = VariationalAutoEncoder(z_dim=args["z_dim"])
    weights, expected = state["model"], model.state_dict()
    if not isinstance(weights, dict) or set(weights) != set(expected):
        names = set(weights) if isinstance(weights, dict) else set()
        odd = sorted(set(expected) - names) or sorted(names - set(expected), key=repr)
        return f"'model' is not the weights of VariationalAutoEncoder(z_dim={args['z_dim']}): {odd[0]!r} is " \
               f"{'missing' if odd[0] in expected else 'no weight of that model'}"
    for name, like in expected.items():
        problem = _tensor_problem(f"model[{name!r}]", weights[name], like)
        if problem:
            return problem
    return _optimizer_problem(state["optimizer"], list(model.parameters()))
