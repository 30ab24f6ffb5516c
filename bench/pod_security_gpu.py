#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""GPU LoRA training as the KubeRay pods now run it (Pod Security "restricted") vs as root.

The rendered pods (e2e_llm.render_kuberay) run as the image's user 1000 in group 100 with no
capabilities (``drop: [ALL]``) and ``allowPrivilegeEscalation: false`` (the kernel's
no_new_privs). This bench runs the same LoRA training loop twice on one GPU, side by side in one
device run: once as root, once in a child that has dropped to exactly those privileges (setgid
100, setuid 1000, bounding set emptied, no_new_privs; checked from /proc/self/status). Each side
also starts NCCL (a one-rank process group and an all-reduce) and compiles a Triton kernel
through ``torch.compile`` (its caches under a HOME of its own, as in the image), the parts of the
CUDA stack that touch files, shared memory or locked pages. The model is SmolLM2-135M's shape
with random weights (speed does not depend on the values); LoRA r=16 on every linear layer.

Steps:
    # on the GPU machine (device `run`; it needs only torch, transformers, peft):
    python3 bench/pod_security_gpu.py run --out $OUT            # ~2 min on one H200
    # here: the table, and one JSON line per figure appended to bench/results.jsonl
    python3 bench/pod_security_gpu.py record <files_at>/pod_security_gpu.json
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _device  # noqa: E402

POD_UID, POD_GID = 1000, 100  # the images' USER and the pods' fsGroup (e2e_llm.render_kuberay)
PR_SET_NO_NEW_PRIVS, PR_CAPBSET_DROP = 38, 24
SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=True)
BATCH, SEQ, WARMUP, STEPS = 16, 512, 5, 40


def drop_to_pod_privileges(home: Path) -> None:
    """What a container with runAsUser 1000, runAsGroup 100, capabilities drop ALL and
    allowPrivilegeEscalation false gets (before anything imports CUDA)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    last_cap = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    for cap in range(last_cap + 1):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), f"prctl(PR_CAPBSET_DROP, {cap})")
    home.mkdir(parents=True, exist_ok=True)
    os.chown(home, POD_UID, POD_GID)
    os.setgroups([])
    os.setgid(POD_GID)
    os.setuid(POD_UID)  # from root to a user: permitted and effective capabilities go too
    os.environ.update(HOME=str(home), USER="ray", TMPDIR=str(home / "tmp"))
    (home / "tmp").mkdir(exist_ok=True)


def privileges() -> dict:
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {"uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups(),
            "cap_eff": status["CapEff"].strip(), "cap_bnd": status["CapBnd"].strip(),
            "no_new_privs": status.get("NoNewPrivs", "?").strip()}


def side(name: str) -> None:
    """One side, in this process: train, NCCL, Triton; the figures as the last line of stdout
    (the restricted side may not write the root-owned $OUT)."""
    if name == "restricted":
        drop_to_pod_privileges(Path(f"/tmp/pod-home-{os.getpid()}"))
    import torch
    import torch.distributed as dist
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    result: dict = {"side": name, **privileges()}
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M)).to("cuda", torch.bfloat16)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batch = torch.randint(0, SMOLLM2_135M["vocab_size"], (BATCH, SEQ)).pin_memory().to("cuda", non_blocking=True)
    losses = []
    for step in range(WARMUP + STEPS):
        if step == WARMUP:
            torch.cuda.synchronize()
            start = time.perf_counter()
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    result.update(tokens_per_s=BATCH * SEQ * STEPS / elapsed, first_loss=losses[0], last_loss=losses[-1])

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29500 + os.getpid() % 1000))
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
    x = torch.ones(1 << 20, device="cuda")
    dist.all_reduce(x)
    dist.destroy_process_group()
    result["nccl_all_reduce"] = float(x[0].item())

    fused = torch.compile(lambda a, b: torch.nn.functional.silu(a) * b)
    a = torch.randn(4096, device="cuda")
    result["triton_max_error"] = float((fused(a, a) - torch.nn.functional.silu(a) * a).abs().max().item())
    print(json.dumps(result))


def run(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for _round in range(2):  # interleaved, so drift in clocks or temperature hits both sides
        for name in ("root", "restricted"):
            proc = subprocess.run([sys.executable, __file__, "side", name], capture_output=True, text=True,
                                  timeout=600)
            if proc.returncode != 0:
                rows.append({"side": name, "error": proc.stderr[-3000:]})
                continue
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    report = {"machine": _device.gpu_name(), "date": _device.today(), "rows": rows}
    (out_dir / "pod_security_gpu.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


def record(path: Path) -> None:
    report = json.loads(path.read_text())
    rows = report["rows"]
    errors = [r for r in rows if "error" in r]
    for r in errors:
        print(f"{r['side']}: FAILED\n{r['error']}")
    print(f"{'side':<11} {'uid':>4} {'gid':>4} {'CapEff':>17} {'NoNewPrivs':>10} {'tokens/s':>10} {'loss':>13} "
          f"{'NCCL':>5} {'Triton err':>10}")
    for r in rows:
        if "error" not in r:
            print(f"{r['side']:<11} {r['uid']:>4} {r['gid']:>4} {r['cap_eff']:>17} {r['no_new_privs']:>10} "
                  f"{r['tokens_per_s']:>10.0f} {r['first_loss']:>6.2f}>{r['last_loss']:<6.2f} "
                  f"{r['nccl_all_reduce']:>5.0f} {r['triton_max_error']:>10.1e}")
    if errors:
        raise SystemExit("a side failed: nothing recorded")
    mean = {name: sum(r["tokens_per_s"] for r in rows if r["side"] == name) / 2 for name in ("root", "restricted")}
    line = {"bench": "pod_security_gpu", "metric": "lora_train_tokens_per_s_restricted_vs_root",
            "value": round(mean["restricted"], 1), "baseline": round(mean["root"], 1),
            "ratio": round(mean["restricted"] / mean["root"], 3), "machine": report["machine"],
            "date": report["date"]}
    print(f"restricted / root: {line['ratio']:.3f} ({line['value']:.0f} vs {line['baseline']:.0f} tokens/s)")
    _device.append_results([line])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run")
    p_run.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "out")))
    p_side = sub.add_parser("side")
    p_side.add_argument("name", choices=("root", "restricted"))
    p_rec = sub.add_parser("record")
    p_rec.add_argument("path", type=Path)
    args = parser.parse_args()
    if args.command == "run":
        run(args.out)
    elif args.command == "side":
        side(args.name)
    else:
        record(args.path)


if __name__ == "__main__":
    main()
