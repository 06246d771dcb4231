"""jaxft's PPO next to TRL 1.12's PPOTrainer (and jaxft's RLOO next to TRL 1.16's RLOOTrainer) on one small
problem with a clear ceiling (issue 31). Prints both runs' curves per rollout batch, side by side.

    python scripts/ppo_vs_trl.py                       # build the problem, PPO both sides, RLOO both sides
    python scripts/ppo_vs_trl.py --only ppo --seeds 0,1,2
    python scripts/ppo_vs_trl.py --jaxft optim.clip_norm=1.0    # extra `jaxft train` overrides (PPO side)

The problem (built in --work, default /tmp/ppo_vs_trl, reused when present):
  * a tiny random Qwen3 (2 layers, hidden 64, transformers' init) with a byte-level tokenizer (256 byte
    tokens + <|endoftext|> (pad) <|im_start|> <|im_end|> (EOS)) and a ChatML template;
  * prompts `n=<k>` (k random, 3-5 digits), one user turn;
  * a reward model trained by `jaxft train` (objective: reward, LoRA r 8, lr 3e-3, 40 steps of 8 pairs) on
    pairs chosen = the digits of k, rejected = as many random lowercase letters, exported by `jaxft export
    --format merged` as a Qwen3ForSequenceClassification directory: the one reward model both libraries load.

PPO, both sides: LoRA r 16 / alpha 32 on all linear layers of the same initial policy (LoRA B = 0, so the
initial policies are the same function), reference = the adapter switched off, value model started from the
reward model (TRL: a full *ForSequenceClassification copy of it, as TRL's example; jaxft: the reward model's
score head on the policy's backbone, `ppo.value_init: reward`), 16 prompts a rollout batch, 4 PPO epochs, one
minibatch, 12-token responses at temperature 1 cut after the first EOS (TRL: stop_token="eos"), kl_coef 0.05
(k1), lr 1e-2 linear to 0, AdamW without weight decay or gradient clipping (TRL's PPOTrainer clips nothing:
jaxft runs with optim.clip_norm=null), 16 rollout batches = 64 optimizer steps = 256 responses.
Not shareable: the sampling RNG streams and the prompt order (both seeded, each its own way), LoRA A's init.
Left as each library does it: a sampled <|endoftext|> (the pad id, 1 of 259 tokens) ends a TRL response's
scored part there (TRL finds lengths by the pad id), while jaxft keeps it as an ordinary token.

RLOO, both sides: the reward model as the reward function (TRL: a path in reward_funcs; jaxft:
reward_model:PATH), G 4, 4 prompts (16 completions) a step, beta 0.05, lr 1e-2 constant, 16 steps.

TRL 1.12 runs in its own virtualenv (PPOTrainer left TRL in 1.13): ~/.cache/jaxft/venv-trl112, made by
this script on first use (pip install trl==1.12.* torch==2.13.0 peft transformers<6). TRL 1.16's RLOO runs
in this interpreter (the test extras). jaxft runs through its CLI (`jaxft train CONFIG key=value ...`).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRL_VENV = Path(os.environ.get("JAXFT_TRL112_VENV", Path.home() / ".cache" / "jaxft" / "venv-trl112"))
TRL_PINS = ["trl==1.12.*", "torch==2.13.0", "peft>=0.17,<0.22", "transformers>=5,<6"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "TRL_EXPERIMENTAL_SILENCE": "1", "HF_DATASETS_OFFLINE": "1"}

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

# the shared settings (names: jaxft's; the TRL workers translate them)
PPO = dict(rollout_batch=16, batches=16, epochs=4, response_length=12, temperature=1.0, kl_coef=0.05, lr=1e-2,
           lora_r=16, lora_alpha=32)
RLOO = dict(G=4, prompts_per_step=4, steps=16, completion_length=12, temperature=1.0, beta=0.05, lr=1e-2,
            lora_r=16, lora_alpha=32)
PPO_KEYS = ("objective/scores", "objective/kl", "objective/entropy", "objective/rlhf_reward", "policy/approxkl_avg",
            "policy/clipfrac_avg", "loss/policy_avg", "loss/value_avg", "val/clipfrac_avg", "val/ratio",
            "val/num_eos_tokens")
RLOO_KEYS = ("reward", "kl", "clip_ratio/region_mean", "completions/mean_length")


def sh(cmd: list, log: Path | None = None, python: str | None = None, **kw) -> None:
    """Run cmd (niced: the machine is shared), its output to `log`; raise with the log's tail on failure."""
    cmd = ["nice", "-n", "10", *map(str, cmd)]
    t0 = time.time()
    with open(log or os.devnull, "w") as f:
        p = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=ENV, cwd=ROOT, **kw)
    if p.returncode:
        tail = Path(log).read_text()[-3000:] if log else ""
        raise SystemExit(f"failed ({p.returncode}): {' '.join(cmd)}\n{tail}")
    print(f"  [{time.time() - t0:.0f} s] {' '.join(cmd[3:])}", flush=True)


def jaxft_cli() -> list[str]:
    return [sys.executable, "-m", "jaxft.cli"]


def write_yaml(path: Path, cfg: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


# ---------------------------------------------------------------- the problem


def build(work: Path, seed: int = 0) -> None:
    """Tokenizer + tiny Qwen3 policy, prompts, preference pairs, the jaxft reward model and its HF export."""
    if (work / "rm" / "config.json").is_file():
        print(f"problem: reusing {work}")
        return
    import torch
    import transformers as tf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    work.mkdir(parents=True, exist_ok=True)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE({c: i for i, c in enumerate(alphabet)}, [], fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    fast = tf.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                      padding_side="left")
    fast.chat_template = CHATML
    fast.save_pretrained(work / "policy")
    V = len(fast)
    cfg = tf.Qwen3Config(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                         tie_word_embeddings=False, bos_token_id=None, eos_token_id=fast.eos_token_id,
                         pad_token_id=fast.pad_token_id)
    torch.manual_seed(seed)
    tf.Qwen3ForCausalLM(cfg).eval().save_pretrained(work / "policy")
    rng = random.Random(seed)

    def k():
        return str(rng.randint(100, 99999))  # 3-5 digits

    rows = [{"prompt": [{"role": "user", "content": f"n={k()}"}]} for _ in range(512)]
    (work / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs = []
    for _ in range(320):  # 40 steps of 8 pairs
        n = k()
        pairs.append({"prompt": f"n={n}", "chosen": n,
                      "rejected": "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in n)})
    (work / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    rm_cfg = write_yaml(work / "reward.yaml", {
        "objective": "reward", "model": {"path": str(work / "policy")},
        "lora": {"r": 8, "alpha": 16, "target_modules": ["all-linear"]},
        "data": {"train": str(work / "pairs.jsonl"), "max_length": 64},
        "optim": {"lr": 3e-3, "warmup_steps": 0, "schedule": "constant"},
        "train": {"steps": 40, "batch_size": 8, "save_every": 40, "out_dir": str(work / "reward_run")},
        "eval": {"metric": "none"}})
    print("problem: reward model (jaxft train, objective: reward)")
    sh([*jaxft_cli(), "train", rm_cfg], work / "reward_train.log")
    sh([*jaxft_cli(), "export", work / "reward_run", "--format", "merged", "--dtype", "fp32", "--out", work / "rm"],
       work / "reward_export.log")


def prompt_ids(work: Path) -> list[list[int]]:
    """The prompts' token ids (chat template + generation prompt), as both libraries see them."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(work / "policy")
    rows = [json.loads(r) for r in (work / "prompts.jsonl").read_text().splitlines()]
    return [tok.apply_chat_template(r["prompt"], tokenize=True, add_generation_prompt=True, return_dict=False)
            for r in rows]


def ceiling(work: Path) -> dict[str, float]:
    """The reward model's mean score (transformers) on fresh answers of each kind, with and without EOS."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(work / "policy")
    rm = AutoModelForSequenceClassification.from_pretrained(work / "rm", dtype=torch.float32).eval()
    rng = random.Random(123)
    out = {}
    for name, chars in (("digits", "0123456789"), ("letters", "abcdefghijklmnopqrstuvwxyz")):
        for L, eos in ((4, True), (12, False)):
            ids = []
            for _ in range(64):
                p = tok.apply_chat_template([{"role": "user", "content": f"n={rng.randint(100, 99999)}"}],
                                            tokenize=True, add_generation_prompt=True, return_dict=False)
                ids.append(p + tok.encode("".join(rng.choice(chars) for _ in range(L)), add_special_tokens=False)
                           + ([tok.eos_token_id] if eos else []))
            width = max(map(len, ids))
            x = torch.tensor([[tok.pad_token_id] * (width - len(i)) + i for i in ids])
            with torch.no_grad():
                out[f"{name}, {L} tokens{' + EOS' if eos else ''}"] = float(rm(input_ids=x).logits[:, 0].mean())
    return out


# ---------------------------------------------------------------- jaxft runs (CLI)


def jaxft_ppo(work: Path, seed: int, extra: list[str]) -> list[dict]:
    c = PPO
    out = work / f"jaxft_ppo_s{seed}"
    cfg = write_yaml(work / "ppo.yaml", {
        "objective": "ppo", "model": {"path": str(work / "policy")},
        "lora": {"r": c["lora_r"], "alpha": c["lora_alpha"], "target_modules": ["all-linear"]},
        "data": {"train": str(work / "prompts.jsonl"), "max_length": 64},
        "rollout": {"max_completion_length": c["response_length"], "temperature": c["temperature"]},
        "ppo": {"reward_model": str(work / "rm"), "value_init": "reward", "num_ppo_epochs": c["epochs"],
                "num_mini_batches": 1, "kl_coef": c["kl_coef"], "kl_estimator": "k1", "missing_eos_penalty": None},
        "optim": {"lr": c["lr"], "schedule": "linear", "warmup_steps": 0, "clip_norm": None, "weight_decay": 0.0},
        "train": {"steps": c["batches"] * c["epochs"], "batch_size": c["rollout_batch"], "grad_accum": 1,
                  "save_every": c["batches"] * c["epochs"], "out_dir": str(out)},
        "eval": {"file": None}})
    if out.exists():
        import shutil

        shutil.rmtree(out)
    args = [*jaxft_cli(), "train", cfg, f"train.seed={seed}", f"data.seed={seed}", *extra]
    sh(args, work / f"jaxft_ppo_s{seed}.log")
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "objective/scores" in r]
    E = c["epochs"]
    per_batch = []
    for b in range(len(rows) // E):
        chunk = rows[b * E:(b + 1) * E]
        d = {k: chunk[0][k] for k in PPO_KEYS if k.startswith("objective/") or k == "val/num_eos_tokens"}
        d.update({k: sum(r[k] for r in chunk) / E for k in PPO_KEYS if k not in d})  # TRL: mean over the epochs
        per_batch.append(d)
    return per_batch


def jaxft_rloo(work: Path, seed: int, extra: list[str]) -> list[dict]:
    c = RLOO
    out = work / f"jaxft_rloo_s{seed}"
    cfg = write_yaml(work / "rloo.yaml", {
        "objective": "rloo", "model": {"path": str(work / "policy")},
        "lora": {"r": c["lora_r"], "alpha": c["lora_alpha"], "target_modules": ["all-linear"]},
        "data": {"train": str(work / "prompts.jsonl"), "max_length": 64},
        "rollout": {"num_generations": c["G"], "max_completion_length": c["completion_length"],
                    "temperature": c["temperature"], "reward_funcs": [f"reward_model:{work / 'rm'}"]},
        "rloo": {"beta": c["beta"]},
        "optim": {"lr": c["lr"], "schedule": "constant", "warmup_steps": 0, "weight_decay": 0.0},
        "train": {"steps": c["steps"], "batch_size": c["G"] * c["prompts_per_step"], "grad_accum": 1,
                  "save_every": c["steps"], "out_dir": str(out)},
        "eval": {"file": None}})
    if out.exists():
        import shutil

        shutil.rmtree(out)
    sh([*jaxft_cli(), "train", cfg, f"train.seed={seed}", f"data.seed={seed}", *extra], work / f"jaxft_rloo_s{seed}.log")
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: r.get(k, float("nan")) for k in RLOO_KEYS} for r in rows if "reward" in r]


# ---------------------------------------------------------------- TRL runs (workers, own processes)


def trl_venv() -> Path:
    py = TRL_VENV / "bin" / "python"
    if not py.exists():
        print(f"making {TRL_VENV} (TRL 1.12, once)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", TRL_VENV], check=True)
        subprocess.run(["nice", "-n", "10", py, "-m", "pip", "install", "-q", *TRL_PINS], check=True)
    return py


def trl_ppo(work: Path, seed: int) -> list[dict]:
    spec = work / "trl_prompts.json"
    if not spec.exists():
        spec.write_text(json.dumps(prompt_ids(work)))
    out = work / f"trl_ppo_s{seed}.json"
    sh([trl_venv(), __file__, "--worker", "trl-ppo", "--work", work, "--seed", seed, "--out", out],
       work / f"trl_ppo_s{seed}.log")
    return json.loads(out.read_text())


def trl_rloo(work: Path, seed: int) -> list[dict]:
    out = work / f"trl_rloo_s{seed}.json"
    sh([sys.executable, __file__, "--worker", "trl-rloo", "--work", work, "--seed", seed, "--out", out],
       work / f"trl_rloo_s{seed}.log")
    return json.loads(out.read_text())


def _callback(rows: list):
    from transformers import TrainerCallback

    class Keep(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs:
                rows.append(dict(logs))

    return Keep()


def worker_trl_ppo(work: Path, seed: int, out: Path) -> None:
    """TRL 1.12 PPOTrainer on the problem (runs in the TRL 1.12 virtualenv; imports no jaxft)."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    torch.set_num_threads(2)
    c = PPO
    tok = AutoTokenizer.from_pretrained(work / "policy", padding_side="left")
    policy = AutoModelForCausalLM.from_pretrained(work / "policy", dtype=torch.float32)
    value = AutoModelForSequenceClassification.from_pretrained(work / "rm", num_labels=1, dtype=torch.float32)
    rm = AutoModelForSequenceClassification.from_pretrained(work / "rm", num_labels=1, dtype=torch.float32)
    ids = json.loads((work / "trl_prompts.json").read_text())
    ds = Dataset.from_list([{"input_ids": i} for i in ids])
    args = PPOConfig(
        output_dir=str(work / f"trl_ppo_s{seed}"), seed=seed, learning_rate=c["lr"], lr_scheduler_type="linear",
        warmup_steps=0, weight_decay=0.0, per_device_train_batch_size=c["rollout_batch"],
        gradient_accumulation_steps=1, num_mini_batches=1, num_ppo_epochs=c["epochs"],
        total_episodes=c["rollout_batch"] * c["batches"], local_rollout_forward_batch_size=c["rollout_batch"],
        response_length=c["response_length"], temperature=c["temperature"], stop_token="eos",
        missing_eos_penalty=None, kl_coef=c["kl_coef"], kl_estimator="k1", num_sample_generations=0,
        use_cpu=True, bf16=False, gradient_checkpointing=False, report_to=[], logging_steps=1,
        save_strategy="no", disable_tqdm=True)
    peft = LoraConfig(r=c["lora_r"], lora_alpha=c["lora_alpha"], lora_dropout=0.0, target_modules="all-linear",
                      task_type="CAUSAL_LM")
    rows: list = []
    trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=None, reward_model=rm,
                         train_dataset=ds, value_model=value, peft_config=peft, callbacks=[_callback(rows)])
    trainer.train()
    out.write_text(json.dumps([{k: r.get(k, float("nan")) for k in PPO_KEYS} for r in rows
                               if "objective/scores" in r]))


def worker_trl_rloo(work: Path, seed: int, out: Path) -> None:
    """TRL 1.16 RLOOTrainer with the reward model as its reward function (this interpreter's TRL)."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer
    from trl import RLOOConfig, RLOOTrainer

    torch.set_num_threads(2)
    c = RLOO
    tok = AutoTokenizer.from_pretrained(work / "policy", padding_side="left")
    rows_in = [json.loads(r) for r in (work / "prompts.jsonl").read_text().splitlines()]
    ds = Dataset.from_list(rows_in)
    n = c["G"] * c["prompts_per_step"]
    args = RLOOConfig(
        output_dir=str(work / f"trl_rloo_s{seed}"), seed=seed, learning_rate=c["lr"], lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, per_device_train_batch_size=n, gradient_accumulation_steps=1,
        num_generations=c["G"], max_completion_length=c["completion_length"], temperature=c["temperature"],
        beta=c["beta"], max_steps=c["steps"], use_cpu=True, bf16=False, gradient_checkpointing=False,
        report_to=[], logging_steps=1, save_strategy="no", disable_tqdm=True)
    peft = LoraConfig(r=c["lora_r"], lora_alpha=c["lora_alpha"], lora_dropout=0.0, target_modules="all-linear",
                      task_type="CAUSAL_LM")
    rows: list = []
    trainer = RLOOTrainer(model=str(work / "policy"), reward_funcs=str(work / "rm"), args=args, train_dataset=ds,
                          processing_class=tok, peft_config=peft, callbacks=[_callback(rows)])
    trainer.train()
    out.write_text(json.dumps([{k: r.get(k, float("nan")) for k in RLOO_KEYS} for r in rows if "reward" in r]))


# ---------------------------------------------------------------- tables


def table(title: str, keys: tuple, sides: dict[str, list[dict]], unit: str) -> str:
    """One line per rollout batch / step; per key, one column per side."""
    names = list(sides)
    short = {k: k.split("/")[-1].replace("_avg", "") for k in keys}
    head = f"{unit:>7} " + " ".join(f"{short[k] + ' ' + n:>{max(10, len(short[k]) + len(n) + 1)}}"
                                    for k in keys for n in names)
    lines = [title, head]
    n_rows = max(len(v) for v in sides.values())
    for i in range(n_rows):
        cells = []
        for k in keys:
            for n in names:
                w = max(10, len(short[k]) + len(n) + 1)
                v = sides[n][i].get(k) if i < len(sides[n]) else None
                cells.append(f"{v:>{w}.4g}" if isinstance(v, (int, float)) else " " * (w - 1) + "-")
        lines.append(f"{i + 1:>7} " + " ".join(cells))
    for label, sl in (("first 4", slice(0, 4)), ("last 4", slice(-4, None)), ("all", slice(None))):
        cells = []
        for k in keys:
            for n in names:
                w = max(10, len(short[k]) + len(n) + 1)
                vals = [r[k] for r in sides[n][sl] if isinstance(r.get(k), (int, float))]
                cells.append(f"{sum(vals) / len(vals):>{w}.4g}" if vals else " " * (w - 1) + "-")
        lines.append(f"{label:>7} " + " ".join(cells))
    return "\n".join(lines)


def mean_runs(runs: list[list[dict]]) -> list[dict]:
    n = min(map(len, runs))
    return [{k: sum(r[i][k] for r in runs) / len(runs) for k in runs[0][0]} for i in range(n)]


def machine() -> str:
    info = Path("/proc/cpuinfo").read_text().split("\n\n")[0]
    get = lambda k: next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith(k)), "?")  # noqa: E731
    flags = set(get("flags").split())
    interesting = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    return (f"{get('model name')}, {os.cpu_count()} cores, flags {' '.join(interesting)}; load "
            f"{Path('/proc/loadavg').read_text().split()[:3]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/ppo_vs_trl"))
    ap.add_argument("--seeds", default="0", help="comma-separated; each side runs once per seed (means printed too)")
    ap.add_argument("--only", choices=("ppo", "rloo"), default=None)
    ap.add_argument("--jaxft", nargs="*", default=[], help="extra `jaxft train` key=value overrides for PPO")
    ap.add_argument("--skip-trl", action="store_true", help="jaxft side only")
    ap.add_argument("--worker", choices=("trl-ppo", "trl-rloo"), help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker == "trl-ppo":
        return worker_trl_ppo(a.work, a.seed, a.out)
    if a.worker == "trl-rloo":
        return worker_trl_rloo(a.work, a.seed, a.out)

    t0 = time.time()
    print(f"machine: {machine()}")
    build(a.work)
    for k, v in ceiling(a.work).items():
        print(f"reward model on fresh answers, {k}: {v:.3f}")
    seeds = [int(s) for s in a.seeds.split(",")]
    if a.only in (None, "ppo"):
        j = [jaxft_ppo(a.work, s, a.jaxft) for s in seeds]
        t = [] if a.skip_trl else [trl_ppo(a.work, s) for s in seeds]
        for i, s in enumerate(seeds):
            sides = {"jaxft": j[i], **({"trl": t[i]} if t else {})}
            print()
            print(table(f"PPO, seed {s}: per rollout batch (jaxft: mean of its 4 optimizer steps' rows; objective/*"
                        f" and num_eos of the batch)", PPO_KEYS[:5], sides, "batch"))
            print(table("", PPO_KEYS[5:], sides, "batch"))
        if len(seeds) > 1:
            sides = {"jaxft": mean_runs(j), **({"trl": mean_runs(t)} if t else {})}
            print()
            print(table(f"PPO, mean over seeds {seeds}", PPO_KEYS[:5], sides, "batch"))
    if a.only in (None, "rloo"):
        j = [jaxft_rloo(a.work, s, []) for s in seeds]
        t = [] if a.skip_trl else [trl_rloo(a.work, s) for s in seeds]
        for i, s in enumerate(seeds):
            print()
            print(table(f"RLOO, seed {s}: per step", RLOO_KEYS, {"jaxft": j[i], **({"trl": t[i]} if t else {})},
                        "step"))
        if len(seeds) > 1:
            print()
            print(table(f"RLOO, mean over seeds {seeds}", RLOO_KEYS,
                        {"jaxft": mean_runs(j), **({"trl": mean_runs(t)} if t else {})}, "step"))
    print(f"\ntotal {time.time() - t0:.0f} s; machine at the end: {machine()}")


if __name__ == "__main__":
    main()
