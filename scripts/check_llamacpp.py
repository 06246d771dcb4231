"""llama.cpp serves what jaxft exports: the merged model as a GGUF, and the base GGUF with the GGUF LoRA,
each answer the held-out prompts greedily with jaxft's own answers; next-token logits agree.

    python scripts/check_llamacpp.py prepare RUN WORK     # jaxft's venv: GGUF files + jaxft's answers
    python scripts/check_llamacpp.py prepare --tiny WORK  # ... of a tiny random model trained 4 steps
    python scripts/check_llamacpp.py prepare --families WORK  # f32 GGUFs of tiny random gemma / gemma3 + logits
    python scripts/check_llamacpp.py serve WORK           # llama-cpp-python's venv: compare, print N/N

scripts/check_llamacpp.sh runs the three steps with the two virtualenvs. Exits 1 when an answer differs.
"""

import json
import sys
from pathlib import Path


def _tiny_run(work: Path) -> Path:
    """A tiny random chat model (SmolLM2's tokenizer), the quickstart task data, 4 LoRA steps."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tiny import save_chat_model

    from jaxft.config import load_config
    from jaxft.data.task import write_task_files
    from jaxft.commands.train import train

    save_chat_model(work / "model", seed=1, head_dim=64)  # vLLM's CPU attention kernels take head_dim 32, 64, ...
    data = write_task_files(work / "data", 64, 16, 16, seed=0)
    run = load_config(None, [f"model.path={work / 'model'}", f"data.train={data['train']}",
                             f"data.validation={data['validation']}", f"eval.file={data['test']}", "eval.max_examples=8",
                             "eval.max_new_tokens=16", "data.max_length=192", "train.steps=4", "train.batch_size=4",
                             "optim.lr=1e-2", "lora.r=8", "lora.alpha=16", f"train.out_dir={work / 'run'}"])
    train(run, progress=False)
    return work / "run"


def expected(run, setup) -> tuple[dict, object]:
    """jaxft's greedy answers to the run's held-out prompts: (the expected.json fields, the tuned model)."""
    from flax import nnx

    from jaxft.checkpoint import restore_trainable
    from jaxft.data.prompts import heldout
    from jaxft.generate import Sampling, chat_prompt, eos_token_ids, generate

    params, meta = restore_trainable(run.train.out_dir, setup.params)
    items = heldout(run.eval.file or run.data.validation, run.data.format, run.eval.max_examples)
    prompts = [chat_prompt(setup.tokenizer, m) for m, _ in items]
    eos = sorted(eos_token_ids(setup.tokenizer, setup.model_path))
    out = generate(setup.graphdef, (params, setup.frozen), prompts, eos_ids=eos,
                   sampling=Sampling(max_new_tokens=run.eval.max_new_tokens))
    fields = dict(step=meta["step"], prompts=prompts, answers=out.ids(), eos=eos, max_new=run.eval.max_new_tokens,
                  n_ctx=max(map(len, prompts)) + run.eval.max_new_tokens + 8)
    return fields, nnx.merge(setup.graphdef, params, setup.frozen)


def prepare(run_dir: Path, work: Path):
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from jaxft.config import load_config
    from jaxft.commands.export import export, hf_config_of
    from jaxft.formats.gguf import write_gguf
    from jaxft.formats.peft import merged_tensors
    from jaxft.setup import build

    run = load_config(run_dir / "config.json")
    export(run, "gguf", work / "model.gguf", gguf_type="f32", overwrite=True)
    export(run, "gguf-lora", work / "lora.gguf", overwrite=True)
    setup = build(run)
    base = nnx.merge(setup.graphdef, setup.params, setup.frozen)  # a fresh adapter: exactly the base model
    write_gguf(merged_tensors(base, np.float32), hf_config_of(setup.model_path), setup.tokenizer, work / "base.gguf",
               gguf_type="f32", source=setup.model_path, overwrite=True)
    fields, tuned = expected(run, setup)
    fields["logits"] = np.asarray(tuned(jnp.asarray([fields["prompts"][0]], jnp.int32))[0][0, -1], np.float32).tolist()
    (work / "expected.json").write_text(json.dumps(fields))
    print(f"prepared step {fields['step']} of {run_dir}: {len(fields['prompts'])} prompts → {work}")


# families whose GGUF transformers' loader cannot read (gemma) or reads only with the original config
# (gemma3: its layer types and per-type rope): llama.cpp itself checks the logits of jaxft's files
FAMILY_TOLERANCE = 1e-3  # max |logit diff| / max |logit|: llama.cpp's f32 kernels, tanh-GELU table included


def prepare_families(work: Path):
    import jax.numpy as jnp
    import numpy as np
    import transformers as tf

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from jaxft.formats.hf import load_pretrained
    from jaxft.formats.gguf import write_gguf
    from jaxft.formats.peft import merged_tensors
    from tiny import example_tokenizer, make_model, save_spm_gemma

    d = work / "gemma"
    save_spm_gemma(d, seed=3)
    made = {"gemma": (d, list(range(2, 300, 23)))}
    d = work / "gemma3"
    make_model("gemma3_text", 3, vocab_size=49152, query_pre_attn_scalar=32, bos_token_id=1, eos_token_id=2,
               pad_token_id=2).save_pretrained(d)
    example_tokenizer().save_pretrained(d)
    made["gemma3"] = (d, [1, 17, 250, 3000, 42, 7, 9000, 12, 600, 2, 77, 5])
    out = {}
    for name, (d, ids) in made.items():
        model = load_pretrained(d)
        f = write_gguf(merged_tensors(model, np.float32), tf.AutoConfig.from_pretrained(d), example_tokenizer(),
                       work / f"{name}.gguf", gguf_type="f32", source=d, overwrite=True)
        out[name] = dict(file=f.name, ids=ids, logits=np.asarray(model(jnp.asarray([ids]))[0][0]).tolist())
    (work / "families.json").write_text(json.dumps(out))
    print(f"prepared {', '.join(out)} → {work}")


def serve_families(work: Path) -> int:
    import numpy as np
    from llama_cpp import Llama

    failed = 0
    for name, e in json.loads((work / "families.json").read_text()).items():
        llm = Llama(model_path=str(work / e["file"]), n_ctx=64, n_threads=2, logits_all=True, verbose=False)
        llm.eval(e["ids"])
        got, want = np.asarray(llm.scores[:len(e["ids"])]), np.asarray(e["logits"])
        diff, scale = float(np.abs(got - want).max()), float(np.abs(want).max())
        same = int((got.argmax(-1) == want.argmax(-1)).sum())
        ok = diff <= FAMILY_TOLERANCE * scale and same == len(e["ids"])
        print(f"llama.cpp {name} f32 GGUF: logits max |diff| {diff:.2e} (scale {scale:.1f}), argmax "
              f"{same}/{len(e['ids'])} identical{'' if ok else '  FAILED'}")
        failed += not ok
    return 1 if failed else 0


def serve(work: Path) -> int:
    import numpy as np
    from llama_cpp import Llama

    if (work / "families.json").is_file():
        return serve_families(work)
    e = json.loads((work / "expected.json").read_text())
    failed = 0
    for label, kw in (("merged GGUF", dict(model_path=str(work / "model.gguf"))),
                      ("base GGUF + GGUF LoRA", dict(model_path=str(work / "base.gguf"), lora_path=str(work / "lora.gguf")))):
        llm = Llama(n_ctx=e["n_ctx"], n_threads=2, logits_all=True, verbose=False, **kw)
        same = 0
        for prompt, want in zip(e["prompts"], e["answers"]):
            llm.reset()
            got = []
            for tok in llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, repeat_penalty=1.0, reset=True):
                if tok in e["eos"] or len(got) == e["max_new"]:
                    break
                got.append(tok)
            same += got == want
        llm.reset()
        llm.eval(e["prompts"][0])
        diff = float(np.abs(np.asarray(llm.scores[len(e["prompts"][0]) - 1]) - np.asarray(e["logits"])).max())
        n = len(e["prompts"])
        print(f"llama.cpp {label}: {same}/{n} answers identical (next-token logits max |diff| {diff:.2e}, "
              f"scale {np.abs(e['logits']).max():.1f})")
        failed += same != n
    return 1 if failed else 0


def main(prepare, serve):
    """`prepare RUN WORK` | `prepare --tiny WORK` | `serve WORK` (shared with check_vllm.py)."""
    mode, *rest = sys.argv[1:]
    if mode == "prepare":
        work = Path(rest[-1])
        work.mkdir(parents=True, exist_ok=True)
        prepare(_tiny_run(work) if rest[0] == "--tiny" else Path(rest[0]), work)
    else:
        sys.exit(serve(Path(rest[0])))


if __name__ == "__main__":
    if sys.argv[1:3] == ["prepare", "--families"]:
        Path(sys.argv[3]).mkdir(parents=True, exist_ok=True)
        prepare_families(Path(sys.argv[3]))
    else:
        main(prepare, serve)
