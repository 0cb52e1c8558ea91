# ruff: noqa: E501  (tables of probe cases)
"""Probe xmoe as a demanding user would (issue 17): bad inputs, kill -9 during checkpoint
writes, concurrent runs on one run dir. Prints the counts and writes them as JSON.

    python scripts/probe_cli.py --out /tmp/probe            # all three parts
    python scripts/probe_cli.py --parts inputs               # only the bad inputs

Bad inputs run in this process through ``xmoe.cli.main`` (an exception escaping it is the
traceback a user would see); kill -9 and concurrency trials run ``xmoe`` in subprocesses with
tiny configs (1 torch thread each).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TINY = [
    "model.vocab_size=300", "data.vocab_size=300", "model.block_size=16", "model.n_layer=2",
    "model.n_head=2", "model.d_model=16", "model.d_ff=32", "model.moe.num_experts=4",
    "model.moe.d_expert=8", "train.batch_size=4", "train.eval_batch_size=8",
    "train.eval_tokens=64", "train.warmup_steps=2", "train.log_every=1", "train.threads=1",
]  # fmt: skip


def sets(*items: str) -> list[str]:
    out = []
    for item in (*TINY, *items):
        out += ["--set", item]
    return out


# ------------------------------------------------------------------------------------------
# Part 1: bad inputs
# ------------------------------------------------------------------------------------------

# (key, [bad raw values]) -- every value is invalid for the key
BAD_VALUES = {
    "train.steps": ["0", "-1", "2.5", "abc", "true", "null", "[1]", "1e3"],
    "train.batch_size": ["0", "-4", "1.5", "x"],
    "train.lr": ["0", "-1", ".nan", ".inf", "fast", "true"],
    "train.min_lr_ratio": ["-0.1", "1.5", ".nan"],
    "train.warmup_steps": ["-1", "0.5"],
    "train.weight_decay": ["-0.1", ".nan", "x"],
    "train.beta1": ["1", "-0.1", "1.5"],
    "train.beta2": ["1.0", ".nan"],
    "train.grad_clip": [".nan", "-1", "x", ".inf"],
    "train.eval_every": ["0", "-1"],
    "train.eval_tokens": ["-1", "x"],
    "train.eval_batch_size": ["0"],
    "train.log_every": ["0"],
    "train.checkpoint_every": ["-1", "1.5"],
    "train.seed": ["-1", "x", "1.5"],
    "train.threads": ["-1", "x"],
    "train.time_limit_s": ["-1", "-0.5", ".nan", "x"],
    "train.precision": ["fp16", "x", "1"],
    "train.tensorboard": ["1", "yes please", "0"],
    "model.n_layer": ["0", "-1", "x"],
    "model.n_head": ["0", "3"],
    "model.d_model": ["0", "15"],
    "model.d_ff": ["0"],
    "model.block_size": ["0", "-1", "100000"],
    "model.vocab_size": ["0", "299"],
    "model.moe_every": ["-1", "3", "1.5"],
    "model.dropout": ["1", "-0.1", "1.5", ".nan"],
    "model.activation": ["foo", "1", "null"],
    "model.moe.num_experts": ["0", "-2", "x", "1.5"],
    "model.moe.d_expert": ["0", "-8"],
    "model.moe.router": ["nope", "1", "null", "[topk]"],
    "model.moe.router_options": ["3", "[1]", "{bogus: 1}", "{threshold: 1.5}"],
    "model.moe.router_options.threshold": ["0", "1.5", "-0.1", "x", ".nan"],
    "model.moe.activation": ["tanh", "3"],
    "model.moe.backend": ["cuda", "x"],
    "model.moe.bias": ["1", "maybe"],
    "model.moe.capacity_factor": ["-1", "0", "x", ".nan"],
    "model.moe.eval_capacity_factor": ["-1", "0"],
    "model.moe.loss_coefs": ["3", "[1]", "{bogus: 1}", "{z_loss: abc}"],
    "model.moe.loss_coefs.z_loss": ["abc", "-1", ".nan", "[1]"],
    "model.moe.loss_coefs.bogus": ["1"],
    "model.moe.local_search": ["0.1", "{bogus: 1}"],
    "model.moe.evo": ["{diversify_step: 0}", "{mask_ratio: 0.5}"],
    "data.val_fraction": ["0", "1", "-0.1", "x", "0.00001"],
    "data.vocab_size": ["100", "x"],
    "data.path": ["[1]", "/nonexistent/corpus.txt"],
    "parallel.expert_parallel": ["0", "3"],
    "task": ["nope", "1"],
    "task_options": ["3", "{bogus: 1}"],
    "train": ["3", "[1]"],
    "model": ["x"],
    "bogus": ["1"],
    "train.bogus": ["1"],
    "model.moe.bogus": ["1"],
    "train.steps.deeper": ["1"],
}  # fmt: skip
MALFORMED_SET = ["train.lr", "=3", "train..lr=1", "train.lr=[1,", "train.lr={a:", "x=: :"]
VALID = [  # valid inputs that must be accepted (exit 0)
    ["train.lr=3e-4"], ["train.lr=1E-3"], ["train.lr=.5e-3"], ["train.time_limit_s=0"],
    ["train.time_limit_s=null"], ["train.grad_clip=0"], ["model.moe_every=2"],
    ["model.moe_every=0", "model.activation=relu"], ["model.moe.loss_coefs.z_loss=1e-3"],
    ["model.moe.router=hash", "model.moe.loss_coefs={load_balance: 0.01}"],
    ["model.moe.capacity_factor=dropless"], ["train.weight_decay=0"],
]  # fmt: skip
CONFIG_FILES = {
    "yaml syntax error": "train:\n  steps: 1\n  lr: [1,\n",
    "yaml tab indent": "train:\n\tsteps: 1\n",
    "list at top": "- 1\n- 2\n",
    "scalar at top": "3\n",
    "section not a mapping": "train: 3\n",
    "unknown section": "bogus:\n  x: 1\n",
    "binary": "\udcff\udcfe\x00",
    "bad value in file": "model:\n  moe:\n    loss_coefs: {z_loss: x}\n",
    "alias bomb": "a: &a [1]\nb: &b [*a, *a]\ntrain: *b\n",
    "python tag": "train: !!python/object/apply:os.system [ls]\n",
}
VALID_FILES = {"yaml 1.1 float": "train:\n  lr: 3e-4\n  steps: 1\n", "empty file": ""}


def _call(argv: list[str]) -> tuple[str, str]:
    """(outcome, stderr) of ``xmoe argv`` in this process; outcome in ok / clear / unclear /
    traceback."""
    from xmoe.cli import main

    err, out = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            code = main(argv)
    except SystemExit as exc:  # argparse's own usage errors
        code = exc.code
    except BaseException as exc:  # noqa: BLE001 - what a user would see as a traceback
        return "traceback", f"{type(exc).__name__}: {exc}"
    message = err.getvalue().strip()
    lines = [ln for ln in message.splitlines() if ln.strip()]
    if code == 0:
        return "ok", message
    one_line = len(lines) == 1 or (len(lines) > 1 and lines[0].startswith("usage:"))
    if code == 2 and lines and "error:" in lines[-1] and "Traceback" not in message and one_line:
        return "clear", lines[-1]
    return "unclear", message


def probe_inputs(work: Path, corpus: Path) -> dict:
    import warnings

    warnings.simplefilter("ignore")
    cases: list[tuple[str, list[str], bool]] = []  # (label, argv, should succeed)
    n = iter(range(10**6))

    def train_args(*items: str, extra: list[str] = ()) -> list[str]:
        run = work / f"in{next(n)}"
        base = ["train", "--run-dir", str(run), "--data", str(corpus), "--no-progress"]
        return base + list(extra) + sets("train.steps=1", "train.eval_every=100", *items)

    for key, values in BAD_VALUES.items():
        for value in values:
            argv = train_args(f"{key}={value}")
            if key == "data.path":  # --data would take its place
                i = argv.index("--data")
                argv = argv[:i] + argv[i + 2 :]
            cases.append((f"--set {key}={value}", argv, False))
    for item in MALFORMED_SET:
        cases.append((f"--set {item}", train_args(extra=["--set", item]), False))
    for items in VALID:
        cases.append(("valid: " + " ".join(items), train_args(*items), True))
    for label, text in {**CONFIG_FILES, **VALID_FILES}.items():
        path = work / f"cfg{next(n)}.yaml"
        path.write_bytes(text.encode("utf-8", "surrogateescape"))
        cases.append(
            (f"config: {label}", train_args(extra=["--config", str(path)]), label in VALID_FILES)
        )
    (work / "afile").write_text("x")
    (work / "adir").mkdir(exist_ok=True)
    trained = work / "trained"
    _call(
        ["train", "--run-dir", str(trained), "--data", str(corpus), "--no-progress"]
        + sets("train.steps=2")
    )
    foreign = work / "foreign"
    foreign.mkdir(exist_ok=True)
    (foreign / "notes.txt").write_text("mine")
    tiny = work / "tiny.txt"
    tiny.write_text("tiny corpus\n")
    runs = str(trained)
    cases += [
        ("--config is a directory", train_args(extra=["--config", str(work / "adir")]), False),
        ("--config missing", train_args(extra=["--config", str(work / "nope.yaml")]), False),
        ("--run-dir is a file", ["train", "--run-dir", str(work / "afile"), "--data", str(corpus)] + sets("train.steps=1"), False),
        ("--data missing", train_args(extra=["--data", str(work / "nope.txt")]), False),
        ("--data is an empty dir", train_args(extra=["--data", str(work / "adir")]), False),
        ("--data corpus too small", train_args(extra=["--data", str(tiny)]), False),
        ("--resume and --overwrite", train_args(extra=["--resume", "--overwrite"]), False),
        ("--resume with --config", ["train", "--run-dir", runs, "--resume", "--config", str(work / "adir")], False),
        ("--resume missing run", ["train", "--run-dir", str(work / "nope"), "--resume"], False),
        ("--resume changes shapes", ["train", "--run-dir", runs, "--resume", "--no-progress", "--set", "model.moe.d_expert=12", "--set", "train.steps=3"], False),
        ("train in a used dir", ["train", "--run-dir", runs, "--data", str(corpus)] + sets("train.steps=1"), False),
        ("--overwrite a foreign dir", ["train", "--run-dir", str(foreign), "--overwrite", "--data", str(corpus)] + sets("train.steps=1"), False),
        ("--task nope", train_args(extra=["--task", "nope"]), False),
        ("eval missing", ["eval", str(work / "nope")], False),
        ("eval a file", ["eval", str(work / "afile")], False),
        ("eval a foreign dir", ["eval", str(foreign)], False),
        ("eval --max-tokens 0", ["eval", runs, "--max-tokens", "0"], False),
        ("eval --batch-size -1", ["eval", runs, "--batch-size", "-1"], False),
        ("eval --threshold 0", ["eval", runs, "--threshold", "0"], False),
        ("eval --threshold 1.5", ["eval", runs, "--threshold", "1.5"], False),
        ("eval --threshold nan", ["eval", runs, "--threshold", "nan"], False),
        ("eval --threshold x", ["eval", runs, "--threshold", "x"], False),
        ("eval --sweep-threshold ,", ["eval", runs, "--sweep-threshold", ","], False),
        ("eval --sweep-threshold 2", ["eval", runs, "--sweep-threshold", "2"], False),
        ("eval --threshold and --sweep", ["eval", runs, "--threshold", "0.5", "--sweep-threshold", "0.5"], False),
        ("eval --renormalize alone", ["eval", runs, "--renormalize"], False),
        ("eval --set bogus", ["eval", runs, "--set", "model.bogus=1"], False),
        ("eval --set shapes", ["eval", runs, "--set", "model.d_model=32"], False),
        ("generate missing", ["generate", str(work / "nope")], False),
        ("generate --max-new-tokens -1", ["generate", runs, "--max-new-tokens", "-1"], False),
        ("generate --top-k 0", ["generate", runs, "--top-k", "0"], False),
        ("generate --temperature 0", ["generate", runs, "--temperature", "0", "--max-new-tokens", "2"], False),
        ("generate --temperature -1", ["generate", runs, "--temperature", "-1", "--max-new-tokens", "2"], False),
        ("generate --temperature nan", ["generate", runs, "--temperature", "nan", "--max-new-tokens", "2"], False),
        ("compare --routers ,", ["compare", "--routers", ","], False),
        ("compare --routers nope", ["compare", "--routers", "nope", "--steps", "1"], False),
        ("compare no --routers", ["compare"], False),
        ("compare --steps 0", ["compare", "--routers", "topk", "--steps", "0"], False),
        ("compare --seeds 0", ["compare", "--preset", "paper", "--seeds", "0"], False),
        ("compare --rows nope", ["compare", "--preset", "paper", "--rows", "nope", "--out", str(work / "p")], False),
        ("plot missing", ["plot", str(work / "nope")], False),
        ("plot a foreign dir", ["plot", str(foreign)], False),
        ("plot --out a file", ["plot", runs, "--out", str(work / "afile")], False),
        ("valid: eval", ["eval", runs, "--max-tokens", "32"], True),
        ("valid: generate", ["generate", runs, "--max-new-tokens", "2"], True),
        ("valid: plot", ["plot", runs], True),
        ("valid: resume", ["train", "--run-dir", runs, "--resume", "--no-progress", "--set", "train.steps=3"], True),
    ]  # fmt: skip
    results = []
    for label, argv, valid in cases:
        outcome, message = _call(argv)
        if valid:
            kind = "accepted" if outcome == "ok" else "valid rejected"
        else:
            kind = {"ok": "silently accepted"}.get(outcome, outcome)
        results.append({"case": label, "kind": kind, "message": message[-300:]})
    bad = [
        r
        for r in results
        if not r["case"].startswith(("valid", "config: yaml 1.1", "config: empty"))
    ]
    counts = {
        "bad_inputs_tried": len(bad),
        "clear_errors": sum(r["kind"] == "clear" for r in bad),
        "tracebacks": sum(r["kind"] == "traceback" for r in bad),
        "unclear_errors": sum(r["kind"] == "unclear" for r in bad),
        "silently_accepted": sum(r["kind"] == "silently accepted" for r in bad),
        "valid_inputs_tried": len(results) - len(bad),
        "valid_rejected": sum(r["kind"] == "valid rejected" for r in results),
    }
    return {"counts": counts, "cases": results}


# ------------------------------------------------------------------------------------------
# Part 2: kill -9 during checkpoint writes
# ------------------------------------------------------------------------------------------

# The child counts the checkpoint's writes, flushes and renames, and kills itself (SIGKILL) at
# event KILL_AT (before it runs); KILL_AT=0 means no targeted kill.
CHILD = r"""
import os, signal, sys, shutil
from pathlib import Path
import xmoe.train.checkpoint as ck
n = [0]
kill_at = int(os.environ.get("KILL_AT", "0"))
def hook(name, fn):
    def wrapped(*a, **k):
        n[0] += 1
        if n[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return fn(*a, **k)
    return wrapped
for name in ("save_model", "save_file", "fsync_file", "fsync_dir"):
    setattr(ck, name, hook(name, getattr(ck, name)))
real_rmtree = shutil.rmtree
ck.shutil = type(sys)("shutil_probe"); ck.shutil.rmtree = hook("rmtree", real_rmtree)
real_rename = Path.rename
Path.rename = hook("rename", real_rename)
real_write_text = Path.write_text
Path.write_text = hook("write_text", real_write_text)
from xmoe.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _xmoe(args: list[str], env_extra: dict | None = None, child: bool = False, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **(env_extra or {})}
    code = ["-c", CHILD] if child else ["-m", "xmoe"]
    return subprocess.Popen([sys.executable, *code, *args], env=env, cwd=ROOT, **kw)


def _weights(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / "checkpoint" / "model.safetensors"))


def _same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def _metrics_ok(run: Path, steps: int) -> bool:
    lines = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln]
    train_steps = [r["step"] for r in lines if r["split"] == "train"]
    finals = [r for r in lines if r.get("final")]
    return train_steps == list(range(1, steps + 1)) and len(finals) == 1


def probe_kills(work: Path, corpus: Path, targeted, random_kills: int, seed: int = 0) -> dict:
    steps = 6
    args = ["train", "--data", str(corpus), "--no-progress"] + sets(
        f"train.steps={steps}", "train.checkpoint_every=2", "train.eval_every=100"
    )
    ref = work / "kill_ref"
    _xmoe(args[:1] + ["--run-dir", str(ref)] + args[1:]).wait()
    reference = _weights(ref)
    trials = []
    rng = random.Random(seed)
    kill_points = list(range(1, targeted + 1)) if isinstance(targeted, int) else list(targeted)
    delays = [rng.uniform(2.5, 8.0) for _ in range(random_kills)]
    for i, point in enumerate([*kill_points, *[None] * random_kills]):
        run = work / f"kill{i}"
        argv = args[:1] + ["--run-dir", str(run)] + args[1:]
        if point is not None:
            proc = _xmoe(argv, {"KILL_AT": str(point)}, child=True, stderr=subprocess.DEVNULL)
            proc.wait()
            killed = proc.returncode == -signal.SIGKILL
        else:
            proc = _xmoe(argv, stderr=subprocess.DEVNULL)
            time.sleep(delays[i - len(kill_points)])
            killed = proc.poll() is None
            if killed:
                proc.send_signal(signal.SIGKILL)
            proc.wait()
        had_checkpoint = any(
            (run / n / "manifest.json").exists() for n in ("checkpoint", "checkpoint.prev")
        )
        resume = _xmoe(
            ["train", "--run-dir", str(run), "--resume", "--no-progress"],
            stderr=subprocess.PIPE,
            text=True,
        )
        _, err = resume.communicate()
        if resume.returncode == 0:
            lost = not (_same_weights(_weights(run), reference) and _metrics_ok(run, steps))
            outcome = "resumed bit-identical" if not lost else "resumed but differs"
        elif not had_checkpoint and ("no checkpoint" in err or "no config.yaml" in err):
            # killed before its first checkpoint: nothing was saved; --overwrite starts over
            again = _xmoe(argv[:1] + ["--overwrite"] + argv[1:], stderr=subprocess.DEVNULL)
            again.wait()
            lost = again.returncode != 0 or not _same_weights(_weights(run), reference)
            outcome = "no checkpoint yet; overwrite ok" if not lost else "overwrite failed"
        else:
            lost, outcome = True, f"resume failed: {err.strip()[-200:]}"
        trials.append(
            {
                "kill_at": point if point is not None else f"t={delays[i - len(kill_points)]:.1f}s",
                "killed": killed,
                "lost": lost,
                "outcome": outcome,
            }
        )
        shutil.rmtree(run, ignore_errors=True)
    return {
        "counts": {
            "kill_trials": len(trials),
            "killed": sum(t["killed"] for t in trials),
            "data_lost": sum(t["lost"] for t in trials),
        },
        "trials": trials,
    }  # fmt: skip


# ------------------------------------------------------------------------------------------
# Part 3: concurrent runs on one run dir
# ------------------------------------------------------------------------------------------


def probe_concurrency(work: Path, corpus: Path) -> dict:
    steps = 400  # long enough that the second process starts while the first trains
    base = ["--data", str(corpus), "--no-progress"] + sets(
        f"train.steps={steps}", "train.checkpoint_every=50", "train.eval_every=200"
    )
    second = {
        "overwrite": lambda run: ["train", "--run-dir", str(run), "--overwrite", *base],
        "resume": lambda run: ["train", "--run-dir", str(run), "--resume", "--no-progress"],
        "fresh train": lambda run: ["train", "--run-dir", str(run), *base],
        "overwrite, other data": lambda run: ["train", "--run-dir", str(run), "--overwrite", *base, "--set", "data.val_fraction=0.2"],
        "two resumes": None,
        "eval while training": lambda run: ["eval", str(run), "--max-tokens", "32"],
        "generate while training": lambda run: ["generate", str(run), "--max-new-tokens", "2"],
        "plot while training": lambda run: ["plot", str(run)],
        "overwrite after the run ended": lambda run: ["train", "--run-dir", str(run), "--overwrite", *base],
    }  # fmt: skip
    trials = []
    for i, (name, make) in enumerate(second.items()):
        run = work / f"conc{i}"
        if name == "two resumes":  # an existing run, resumed twice at once
            _xmoe(
                [
                    "train",
                    "--run-dir",
                    str(run),
                    *base[:3],
                    *sets("train.steps=20", "train.checkpoint_every=10"),
                ]
            ).wait()
            cmd = [
                "train",
                "--run-dir",
                str(run),
                "--resume",
                "--no-progress",
                "--set",
                f"train.steps={steps}",
            ]
            a = _xmoe(cmd, stderr=subprocess.PIPE, text=True)
            time.sleep(0.3)
            b = _xmoe(cmd, stderr=subprocess.PIPE, text=True)
        else:
            a = _xmoe(["train", "--run-dir", str(run), *base], stderr=subprocess.PIPE, text=True)
            deadline = time.time() + 60
            while not (run / "checkpoint" / "manifest.json").exists() and time.time() < deadline:
                time.sleep(0.2)  # A is training
            b = _xmoe(make(run), stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        _, err_b = b.communicate()
        running = a.poll() is None  # A was still running when B ended
        _, err_a = a.communicate()
        overlapped = running or "in use by another xmoe process" in (err_a + err_b)
        codes = sorted([a.returncode, b.returncode])
        reader = name.endswith("while training")
        refused = reader or (
            codes == [0, 2] and "in use by another xmoe process" in (err_a + err_b)
        )
        ok_state = False
        try:
            summary = json.loads((run / "summary.json").read_text())
            cfg_steps = (run / "config.yaml").read_text().count(f"steps: {steps}") >= 1
            from xmoe.train.checkpoint import resolve_checkpoint

            ok_state = summary["steps"] == steps and cfg_steps and _metrics_ok(run, steps)
            ok_state = ok_state and resolve_checkpoint(run, warn=False).step == steps
        except (OSError, ValueError, KeyError, AttributeError):
            ok_state = False
        reader_ok = not reader or b.returncode == 0 or "error:" in err_b
        if (
            name == "overwrite after the run ended"
        ):  # after A finished, B's overwrite + a resume work
            again = _xmoe(make(run), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            ok_state = ok_state and again.wait() == 0
        lost = not (refused and ok_state and reader_ok)
        trials.append(
            {
                "trial": name,
                "overlapped": overlapped,
                "codes": [a.returncode, b.returncode],
                "lost": lost,
                "refusal": (err_b or err_a).strip()[-200:],
            }
        )
        shutil.rmtree(run, ignore_errors=True)
    return {
        "counts": {
            "concurrent_trials": len(trials),
            "overlapped": sum(t["overlapped"] for t in trials),
            "data_lost": sum(t["lost"] for t in trials),
        },
        "trials": trials,
    }  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--parts", default="inputs,kills,concurrency")
    p.add_argument("--out", default=None, help="folder for probe.json (default: a temp folder)")
    p.add_argument(
        "--targeted-kills", type=int, default=30, help="kills at the first N checkpoint events"
    )
    p.add_argument("--random-kills", type=int, default=10)
    p.add_argument(
        "--kill-points",
        help="instead of --targeted-kills: these events, e.g. 9,11-22 (the "
        "first save's last rename and every event of the second save)",
    )
    args = p.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    work = Path(tempfile.mkdtemp(prefix="xmoe-probe-"))
    from xmoe.data import shakespeare_documents

    corpus = work / "corpus.txt"
    corpus.write_text(shakespeare_documents()[5].text[:30_000])
    report = {}
    parts = args.parts.split(",")
    if "inputs" in parts:
        report["inputs"] = probe_inputs(work, corpus)
        print("inputs:", json.dumps(report["inputs"]["counts"]), flush=True)
    if "kills" in parts:
        points = args.targeted_kills
        if args.kill_points is not None:
            points = []
            for part in filter(None, args.kill_points.split(",")):
                lo, _, hi = part.partition("-")
                points += list(range(int(lo), int(hi or lo) + 1))
        report["kills"] = probe_kills(work, corpus, points, args.random_kills)
        print("kill -9:", json.dumps(report["kills"]["counts"]), flush=True)
    if "concurrency" in parts:
        report["concurrency"] = probe_concurrency(work, corpus)
        print("concurrency:", json.dumps(report["concurrency"]["counts"]), flush=True)
    out = Path(args.out) if args.out else work
    out.mkdir(parents=True, exist_ok=True)
    (out / "probe.json").write_text(json.dumps(report, indent=1))
    print(f"details: {out / 'probe.json'}")
    shutil.rmtree(work, ignore_errors=True) if args.out else None
    return 0


if __name__ == "__main__":
    sys.exit(main())
