"""``interp-sweeps plan SWEEP [options]``: what a sweep will take, before any weights load.

Reads only the model's configuration (a hub name, a model directory or a ``config.json``;
``sweeps/runtime/shapes.py``) and prints the parameters and weight bytes, one replica's
memory (weights, the clean state its job keeps, one pass) and its placement on devices,
the passes and the FLOPs, and an estimate of the time on the detected or named device
(``sweeps/core/footprint.py`` holds the arithmetic). A replica that does not fit is said in
one line (exit code 2) with what would fit: a smaller dtype, more devices per replica,
shorter prompts.

The prompt length is the task's typical one unless ``--seq-len`` gives it (the tokenizer is
not read); ``--json`` prints the same as one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

from sweeps.registry.cli import UserError, did_you_mean

# Typical prompt lengths (tokens) of the built-in tasks: planning needs no tokenizer.
TYPICAL_SEQ_LEN = {"ioi": 20, "ioi-s2": 20, "sentiment": 16, "text": 64}
TYPICAL_N_PROMPTS = {"ioi": 64, "ioi-s2": 64, "sentiment": 50, "text": 32}

# Dense peak FLOP/s of a device (bfloat16/float16 tensor cores; float32 without them), and
# the share of it a sweep's matrix products reach (their shapes are the forward's).
DEVICES = {
    "H100": dict(memory_gb=80, half=989e12, single=67e12),
    "H200": dict(memory_gb=141, half=989e12, single=67e12),
    "A100": dict(memory_gb=80, half=312e12, single=19.5e12),
    "L40S": dict(memory_gb=48, half=362e12, single=91.6e12),
    "A10G": dict(memory_gb=24, half=70e12, single=31.2e12),
    "L4": dict(memory_gb=24, half=121e12, single=30.3e12),
}
EFFICIENCY = 0.4

HELP = """What a sweep will take, from the model's configuration alone (no weights are read):
parameters, weight bytes, one replica's memory and its placement on devices, passes, FLOPs
and an estimated time.

  interp-sweeps plan backup --model meta-llama/Llama-3.1-8B --dtype bfloat16 --gpu H100
  interp-sweeps plan attribution --model config.json --devices-per-replica 8 --gpu H100 --json

Every option of the sweep is accepted (the ones that change its size are read); the plan's
own options are below. Exit code 2, with what would fit, when a replica does not fit."""


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def parser(sweep_cls) -> argparse.ArgumentParser:
    p = sweep_cls.parser()
    p.prog = f"interp-sweeps plan {sweep_cls.name}"
    p.description = HELP
    g = p.add_argument_group("plan")
    g.add_argument("--gpu", metavar="NAME", help=f"plan for this GPU ({', '.join(DEVICES)}) instead of the one here")
    g.add_argument(
        "--device-memory",
        type=float,
        metavar="GB",
        help="memory of one device in GB (default: the named or detected GPU's, else this machine's available memory)",
    )
    g.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    return p


def _device(args) -> dict:
    """The device planned for: its name, memory budget in bytes and FLOP/s in the run's dtype."""
    half = args.dtype != "float32"
    if args.gpu:
        key = next((k for k in DEVICES if k.lower() == args.gpu.lower()), None)
        if key is None:
            raise UserError(
                f"unknown --gpu {args.gpu!r}{did_you_mean(args.gpu.upper(), DEVICES)}; known: {', '.join(DEVICES)}"
            )
        spec = DEVICES[key]
        name, memory, flops = key, spec["memory_gb"] * 1e9, spec["half" if half else "single"]
    else:
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            name, memory = props.name, float(props.total_memory)
            known = next((DEVICES[k] for k in DEVICES if k in props.name), DEVICES["A100"])
            flops = known["half" if half else "single"]
        else:
            from sweeps.jobs.sizing import available_memory

            name, memory, flops = "CPU", float(available_memory()), _cpu_flops(args.dtype)
    if args.device_memory is not None:
        if args.device_memory <= 0:
            raise UserError("--device-memory must be a positive number of GB")
        memory = args.device_memory * 1e9
    return {"name": name, "memory": memory, "flops": flops}


def _cpu_flops(dtype: str) -> float:
    """This CPU's matrix-product rate in ``dtype``, measured on a few products (a fraction of a second)."""
    import time

    import torch

    from sweeps.core import precision

    a = torch.randn(512, 512, dtype=precision.dtype_of(dtype))
    torch.mm(a, a)
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < 0.2:
        torch.mm(a, a)
        n += 1
    return 2 * 512**3 * n / (time.perf_counter() - start) / EFFICIENCY  # its "peak": reached at EFFICIENCY


def plan(sweep_name: str, args) -> dict:
    """The plan as a dict (what ``--json`` prints)."""
    from sweeps.core import footprint as F
    from sweeps.jobs import sizing
    from sweeps.runtime.shapes import ShapeError, model_shape

    try:
        shape = model_shape(args.model)
    except ShapeError as err:
        raise UserError(str(err)) from None
    k = args.devices_per_replica
    if k < 1:
        raise UserError("--devices-per-replica must be at least 1")
    if k > shape.n_layers:
        raise UserError(f"--devices-per-replica {k}: the model has only {shape.n_layers} layers to split")
    device = _device(args)
    task = str(args.task)
    seq_len = args.seq_len or TYPICAL_SEQ_LEN.get(task, 32)
    n_prompts = args.n_prompts or TYPICAL_N_PROMPTS.get(task, 64)
    size = F.DTYPE_BYTES[args.dtype]
    device_type = "cuda" if device["name"] != "CPU" else "cpu"  # a job's first pass there
    L, H = shape.n_layers, shape.n_heads
    if sweep_name == "backup":
        options = {
            "batch_size": args.batch_size,
            "ablation": args.ablation,
            "points_per_prompt": seq_len - 1 if task == "text" else 1,
        }
        work = f"{L * H} heads"
    elif sweep_name == "scale":
        scales = len(str(args.scales).split(","))
        pairs = min(n_prompts * (n_prompts - 1), int(args.max_pairs or 64))
        nodes = L * (H + 1)
        options = {"nodes": nodes, "rows_per_node": scales * pairs, "corrupt_source": args.pairs == "task"}
        work = f"{nodes} nodes x {scales} scales x {pairs} pairs"
    elif sweep_name == "attribution":
        steps = args.ig_steps if str(args.method).startswith("eap-ig") else 1
        options = {"batch_size": args.batch_size, "steps": steps}
        work = f"{F.n_edges(shape)} edges, {args.method}"
    elif sweep_name == "circuit":
        from sweeps.registry.circuit import is_mib

        given = getattr(args, "sizes", None)
        # mib: MIB's ten fractions, each ranked by score and by |score|
        sizes = 20 if is_mib(given) else len(str(given).split(",")) if given else 16
        options = {"circuits": sizes}
        work = f"{sizes} circuits of {F.n_edges(shape)} edges"
    else:
        raise UserError(f"plan covers backup, scale, attribution and circuit, not {sweep_name!r}")
    fp = sizing.estimate(sweep_name, shape, n_prompts, seq_len, size, device_type, options)
    staged = F.stages(shape, k, size)
    weights_total = sum(b for _, b in staged)

    # the clean state and the pass spread over the stages as the layers do
    def spread(extra: int) -> list[int]:  # the clean state and a pass spread over the stages as the layers do
        return [int(b + extra * len(layers) / shape.n_layers) for layers, b in staged]

    per_device = spread(fp.clean_bytes + fp.pass_bytes)
    least = spread(fp.clean_bytes + fp.least_pass_bytes)
    replicas = max(1, int(getattr(args, "num_workers", None) or 1))
    seconds = fp.flops / (device["flops"] * EFFICIENCY) / replicas
    out = {
        "sweep": sweep_name,
        "model": args.model,
        "family": shape.family,
        "dtype": args.dtype,
        "n_prompts": n_prompts,
        "seq_len": seq_len,
        "parameters": shape.parameters,
        "weight_bytes": weights_total,
        "clean_state_bytes": fp.clean_bytes,
        "pass_bytes": fp.pass_bytes,
        "per_replica_bytes": weights_total + fp.clean_bytes + fp.pass_bytes,
        "devices_per_replica": k,
        "stages": [{"layers": [r.start, r.stop - 1], "bytes": b} for (r, _), b in zip(staged, per_device)],
        "bytes_per_device": per_device,
        "device": device["name"],
        "device_memory_bytes": int(device["memory"]),
        "least_bytes_per_device": least,
        "fits": max(least) <= device["memory"],
        "work": work,
        "passes": fp.passes,
        "flops": fp.flops,
        "replicas": replicas,
        "estimated_seconds": seconds,
    }
    return out


PLANNED = ("backup", "scale", "attribution", "circuit")


def check_budget(sweep_name: str, args: argparse.Namespace, n_prompts: int, seq_len: int) -> None:
    """Before any weights load: a ``UserError`` (one line) when even one prompt a pass of this
    run cannot fit ``--memory-budget`` GB on each of its ``--devices-per-replica`` devices. A model whose config cannot be read for a plan (a
    TransformerLens checkpoint) is not checked."""
    if sweep_name not in PLANNED or args.memory_budget is None:
        return
    if args.memory_budget <= 0:
        raise UserError("--memory-budget must be a positive number of GB")
    planned = argparse.Namespace(**vars(args))
    planned.n_prompts, planned.seq_len, planned.device_memory = n_prompts, seq_len, args.memory_budget
    planned.gpu, planned.json = None, False
    try:
        p = plan(sweep_name, planned)
    except UserError:
        return
    if not p["fits"]:
        raise UserError(f"--memory-budget {args.memory_budget:g} GB: {_advice(p, p['stages'][-1]['layers'][1] + 1)}")


def _advice(p: dict, shape_layers: int) -> str:
    """What would fit, for the one-line refusal."""
    need, have = max(p["least_bytes_per_device"]), p["device_memory_bytes"]
    ideas = []
    if p["dtype"] == "float32":
        ideas.append("--dtype bfloat16 (half the bytes)")
    k = p["devices_per_replica"]
    more = min(shape_layers, math.ceil(k * need / have) if have > 0 else k + 1)
    if more > k:
        ideas.append(f"--devices-per-replica {more}")
    if p["clean_state_bytes"] + p["pass_bytes"] > 0.2 * need:
        ideas.append("fewer --n-prompts or shorter prompts")
    return (
        f"even with one prompt a pass, one replica needs {_gb(need)} on its largest device but a device "
        f"({p['device']}) has {_gb(have)}; "
        f"it would fit with {' or '.join(ideas) if ideas else 'a larger device'}"
    )


def main(argv: list[str]) -> int:
    from sweeps.registry import SWEEPS

    names = [n for n in SWEEPS if n in ("backup", "scale", "attribution", "circuit")]
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: interp-sweeps plan SWEEP [options]   (SWEEP: {', '.join(names)})\n\n{HELP}")
        return 0 if argv else 2
    if argv[0] not in names:
        print(
            f"error: plan: unknown sweep {argv[0]!r}{did_you_mean(argv[0], names)}; sweeps: {', '.join(names)}",
            file=sys.stderr,
        )
        return 2
    name = argv[0]
    args = parser(SWEEPS[name]).parse_args(argv[1:])
    try:
        p = plan(name, args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(p, indent=1))
    else:
        _print(p)
    if not p["fits"]:
        print(f"error: {_advice(p, p['stages'][-1]['layers'][1] + 1)}", file=sys.stderr)
        return 2
    return 0


def _print(p: dict) -> None:
    t = p["estimated_seconds"]
    when = f"{t:.0f} s" if t < 120 else f"{t / 60:.0f} min" if t < 7200 else f"{t / 3600:.1f} h"
    print(
        f"plan: {p['sweep']} sweep of {p['model']} ({p['family']}), {p['dtype']}, "
        f"{p['n_prompts']} prompts x {p['seq_len']} tokens"
    )
    print(f"  parameters     {p['parameters'] / 1e9:.3f} B (weights {_gb(p['weight_bytes'])} in {p['dtype']})")
    print(
        f"  per replica    {_gb(p['per_replica_bytes'])} = weights {_gb(p['weight_bytes'])} + clean state "
        f"{_gb(p['clean_state_bytes'])} + one pass {_gb(p['pass_bytes'])}"
    )
    k = p["devices_per_replica"]
    print(
        f"  placement      {k} device{'s' if k > 1 else ''} per replica ({p['device']}, {_gb(p['device_memory_bytes'])} each):"
    )
    for i, s in enumerate(p["stages"]):
        a, b = s["layers"]
        extra = (" + embeddings" if i == 0 else "") + (" + unembedding" if i == len(p["stages"]) - 1 else "")
        print(f"    stage {i}: layers {a}-{b}{extra}: {_gb(s['bytes'])}")
    print(f"  work           {p['work']}: {p['passes']} passes, {p['flops']:.2e} FLOPs")
    print(
        f"  time           about {when} on {p['replicas']} replica{'s' if p['replicas'] > 1 else ''} "
        f"({p['device']}, {EFFICIENCY:.0%} of its peak)"
    )
