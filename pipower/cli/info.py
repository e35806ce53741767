"""`pipower info`: what this installation can run and uses by default, optionally a loaded model."""
from __future__ import annotations

import json

from .args import add_device_args, add_json, add_model_args, load_kwargs


def add_commands(sub) -> None:
    i = sub.add_parser("info", help="show backends, compiled extension, threads, BLAS and GPU",
                       description="Report what this installation can run and what it uses by default.")
    add_json(i)
    add_model_args(i, optional="also load this model and report its config, weight format and placement")
    add_device_args(i)


def cmd_info(args) -> int:
    from ..errors import InvalidArgumentError
    from ..info import info, model_info
    report = info()
    if not args.model and (args.device != "cpu" or args.vram_budget or args.placement or args.stats):
        raise InvalidArgumentError("--device, --vram-budget, --placement and --stats describe how to load "
                                   "a model: give it with -m")
    if args.model:
        import pipower
        report["model"] = model_info(pipower.load(args.model, **load_kwargs(args)))
    if args.json:
        print(json.dumps(report, indent=2, default=str))
        return 0
    print(f"pipower {report['pipower']}  python {report['python']}  numpy {report['numpy']}")
    print(f"platform: {report['platform']}")
    for name, b in report["backends"].items():
        state = "available" if b["available"] else f"NOT available ({b.get('error')})"
        print(f"backend {name:7s}: {state}")
        for d in b.get("devices", []):
            print(f"    GPU {d['id']}: {d['name']} (sm {d['compute_capability']}), "
                  f"{d['memory_total_bytes'] / 2**30:.1f} GiB total, {d['memory_free_bytes'] / 2**30:.1f} GiB free")
        if b.get("build"):
            print("    build: " + ", ".join(f"{k}={v}" for k, v in b["build"].items()))
        ik = b.get("integer_kernels")
        if ik:
            used = f"uses {ik['default']}" if "default" in ik else f"ERROR: {ik['error']}"
            print(f"    integer dots: {used} (this CPU and build run: {', '.join(ik['available'])}; "
                  f"PIPOWER_INT_ISA=<name> picks one)")
        if b.get("silu"):
            print(f"    SiLU products: {b['silu']}")
    print(f"default backend: {report['default_backend']}  threads: {report['threads']}")
    if report["fallback_warning"]:
        print(f"WARNING: {report['fallback_warning']}")
    for blas in report["blas"]:
        print(f"BLAS: {blas['internal_api']} {blas['version']} ({blas['architecture']}), "
              f"{blas['num_threads']} threads")
    if "model" in report:
        print("model: " + ", ".join(f"{k}={v}" for k, v in report["model"].items()))
    return 0


COMMANDS = {"info": cmd_info}
