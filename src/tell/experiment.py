"""Experiments: compose the stages into user-facing jobs (mix, train, generate, eval, compare).

This is the only module that imports every stage and the only one that decides output paths. Every
job validates all user input (files, rows, ratio, model path) before a model is loaded, writes into
``<out>.partial`` and renames it to ``<out>`` only when the job is complete.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tell.anchor import anchored_examples, check_placement, resolve_anchor_text
from tell.config import RunConfig, dump_config, non_default_values
from tell.data import Example, FieldMap, TellInputError, load_examples
from tell.mix import Mix, build_mix, describe_mix, write_mix
from tell.model import autocast_dtype, context_length, load_model, load_tokenizer, pick_device


@dataclass(frozen=True)
class PreparedMix:
    mix: Mix
    tokenizer: object
    anchor: str
    max_length: int


def field_map(cfg: RunConfig) -> FieldMap:
    """Return the field names to read rows with, honouring the user's overrides."""
    fields = FieldMap(messages=cfg.data.messages_field)
    if cfg.data.prompt_field:
        fields = FieldMap(**{**fields.__dict__, "prompt": (cfg.data.prompt_field,)})
    if cfg.data.response_field:
        fields = FieldMap(**{**fields.__dict__, "response": (cfg.data.response_field,)})
    return fields


def model_max_length(cfg: RunConfig) -> int:
    """Return max_length: the configured one, else the model's context read from its config only."""
    if cfg.mix.max_length:
        return cfg.mix.max_length
    from transformers import AutoConfig
    from tell.model import resolve_model_path
    return context_length(AutoConfig.from_pretrained(resolve_model_path(cfg.model.name)))


def prepare_mix(cfg: RunConfig, task_examples: list[Example] | None = None,
                general_examples: list[Example] | None = None) -> PreparedMix:
    """Return the validated, anchored, token-budgeted mix; raises on bad input before any model loads."""
    task_name = ""
    select_here, selection = task_examples is None and bool(cfg.data.select), None
    if task_examples is None:
        if not cfg.data.task and not (select_here and cfg.data.select_pool):
            raise TellInputError("no task data: pass --task FILE", None, None, "data.task")
        if not (select_here and cfg.data.select_pool):  # the selection's pool replaces the task file
            task_examples = load_examples(cfg.data.task, "task", field_map(cfg))
        task_name = Path(cfg.data.select_pool if select_here and cfg.data.select_pool else cfg.data.task).stem
    if general_examples is None and cfg.mix.mode != "sft":
        general_examples = load_examples(cfg.data.general, "general", field_map(cfg))
    if select_here:
        selection = task_selection(cfg, task_examples, cfg.select.k, cfg.select.tokens)
        task_examples = [row.example for row in selection.rows]
    tokenizer = load_tokenizer(cfg.model.name)
    check_placement(tokenizer, cfg.anchor.placement, cfg.model.name)
    resolve_self_instruct(cfg, task_examples, task_name)
    anchor = resolve_anchor_text(cfg.anchor)
    task_examples = anchored_examples(task_examples, anchor, cfg.anchor.placement)
    count_tokenizer, count_name = tokenizer, cfg.model.name
    if cfg.mix.count_tokenizer:
        count_tokenizer, count_name = load_tokenizer(cfg.mix.count_tokenizer), cfg.mix.count_tokenizer
    max_length = model_max_length(cfg)
    mix = build_mix(task_examples, general_examples or [], cfg.mix, count_tokenizer, max_length,
                    tokenizer_name=count_name if count_name != "default" else "SmolLM2-135M-Instruct (embedded)")
    mix.manifest.update(anchor=anchor, anchor_placement=cfg.anchor.placement)
    if selection is not None:
        mix.manifest["selection"] = selection.record
    return PreparedMix(mix, tokenizer, anchor, max_length)


def task_selection(cfg: RunConfig, pool_examples: list[Example] | None, k: int, tokens: int):
    """Return the select.Selection of task rows that data.select asks for: k rows (or rows up to `tokens`
    tokens) from data.select_pool, else from `pool_examples` (the task file, or a task's training pool)."""
    from tell.select import choose_rows, pool_from_examples, read_pool
    if cfg.data.select_pool:
        pool, where = read_pool(cfg.data.select_pool, field_map(cfg)), cfg.data.select_pool
    else:
        pool, where = pool_from_examples(pool_examples or []), cfg.data.task or "the task's training pool"
    return choose_rows(pool, cfg.data.select, k, tokens, cfg.select, cfg.model, cfg.mix.count_tokenizer, where)


def run_select(cfg: RunConfig, overwrite: bool = False):
    """Choose rows of data.select_pool (method data.select, default kcenter) and write them to cfg.out with
    selection.json and selection.png beside it; return the select.Selection."""
    from tell.config import config_dict
    from tell.select import check_outputs, choose_rows, read_pool, write_selection
    announce(cfg)
    check_outputs(cfg.out, overwrite)
    pool = read_pool(cfg.data.select_pool, field_map(cfg), answers_required=False)
    selection = choose_rows(pool, cfg.data.select or "kcenter", cfg.select.k, cfg.select.tokens, cfg.select,
                            cfg.model, cfg.mix.count_tokenizer, cfg.data.select_pool)
    write_selection(selection, cfg.out, config_dict(cfg))
    return selection


def resolve_self_instruct(cfg: RunConfig, task_examples: list[Example], task_name: str = "") -> str:
    """Return the anchor text, first writing a self-instruct anchor into cfg.anchor.text if one is due.

    Only for anchor.mode self-instruct without a text yet: the base model reads anchor.self_instruct_rows
    task rows and describes the task greedily. An anchor with 8 words of a training target is rejected and
    written again (other rows, then the answers withheld); after anchor.self_instruct_tries the task's
    default anchor (of `task_name`, else eval.task) is used, with a message. The text then lives in the
    config (and the run's anchor.txt), so training, inference and the cache all see the same anchor.
    """
    if cfg.anchor.mode != "self-instruct" or cfg.anchor.text or cfg.anchor.file:
        return cfg.anchor.text
    from tell.anchor import default_anchor_text, self_instruct_anchor
    from tell.config import GenerateConfig
    from tell.generate import generate_texts, load_for_generation, prompt_texts
    from tell.diagnostics import copied_span
    run = load_for_generation(None, cfg.model)
    greedy = GenerateConfig(greedy=True, batch_size=1, repetition_penalty=cfg.generate.repetition_penalty)

    def generate(messages: tuple[dict, ...]) -> str:
        texts = prompt_texts(run, [messages], use_anchor=False)
        return generate_texts(run.model, run.tokenizer, texts, greedy, cfg.anchor.self_instruct_max_new_tokens,
                              progress=False)[0]

    targets = [e.answer for e in task_examples]
    written = self_instruct_anchor(task_examples, generate, cfg.anchor.meta_prompt,
                                   rows=cfg.anchor.self_instruct_rows, tries=cfg.anchor.self_instruct_tries,
                                   seed=cfg.mix.seed, copied=lambda text: copied_span(text, targets),
                                   fallback=default_anchor_text(task_name or cfg.eval.task))
    for i, reason in enumerate(written.rejected, 1):
        print(f"[tell] self-instruct anchor {i} rejected: {reason}", file=sys.stderr)
    if written.fell_back:
        print(f"[tell] no self-instruct anchor in {written.tries} tries; using the task's default anchor",
              file=sys.stderr)
    cfg.anchor.text = written.text
    print(f"[tell] self-instruct anchor: {cfg.anchor.text}", file=sys.stderr)
    return cfg.anchor.text


def heldout_general(cfg: RunConfig) -> list[Example]:
    """Return the held-out general rows of the retention loss: a seeded sample of eval.general_rows rows
    of eval.general_heldout that are not in the general pool (empty when switched off or none is left)."""
    from tell.data import DATASETS_DIR
    from tell.tasks import seeded_sample
    if not cfg.eval.general_rows or cfg.eval.general_heldout == "none":
        return []
    if cfg.eval.general_heldout == "auto":  # 300 DPO-demo answers; not in the built-in `alpaca` pool
        rows = load_examples(DATASETS_DIR / "dpo_en_demo.json", "general")
    else:
        rows = load_examples(cfg.eval.general_heldout, "general", field_map(cfg))
    def digest(e: Example) -> bytes:  # digests, not texts: the ShareGPT pool's texts take ~125 MB
        return hashlib.sha256(json.dumps(e.messages, sort_keys=True).encode()).digest()
    pool = {digest(e) for e in load_examples(cfg.data.general, "general", field_map(cfg))}
    kept = [e for e in rows if digest(e) not in pool]
    return seeded_sample(kept, cfg.eval.general_rows, cfg.eval.test_seed)


def run_harness(cfg: RunConfig, run_dir: str | None, tasks: str) -> Path:
    """Run lm-evaluation-harness tasks on the base model and on base + the run's adapter; return harness.json."""
    try:
        import lm_eval
    except ImportError:
        raise TellInputError("--harness needs lm-evaluation-harness, which is not installed (pip install "
                             "lm-eval); its tasks also download their data from the Hugging Face hub, so the "
                             "hub must be reachable. Without it, compare/sweep report the held-out general "
                             "loss instead.") from None
    from tell.generate import load_run_config
    from tell.model import resolve_model_path
    model_name = load_run_config(run_dir).model.name if run_dir else cfg.model.name
    base = f"pretrained={resolve_model_path(model_name)}"
    models = {"base": base} | ({"adapter": f"{base},peft={Path(run_dir) / 'adapter'}"} if run_dir else {})
    results = {}
    for name, model_args in models.items():
        try:
            out = lm_eval.simple_evaluate(model="hf", model_args=model_args, tasks=tasks.split(","),
                                          limit=cfg.eval.limit or None, device=str(pick_device(cfg.model)))
        except Exception as err:  # noqa: BLE001 - lm-eval raises many kinds; most often its data is unreachable
            raise TellInputError(f"lm-eval could not run {tasks!r} on {name}: {err} (its data comes from the "
                                 "hub: is it reachable?)") from None
        results[name] = out["results"]
    path = Path(cfg.out or (Path(run_dir) if run_dir else Path("."))) / "harness.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1, default=str) + "\n", encoding="utf-8")
    return path


def check_output(out: str | Path, overwrite: bool) -> Path:
    """Return `out` as a Path, or raise when it is missing or exists (checked before expensive work)."""
    if not str(out).strip():
        raise TellInputError("no output directory: pass --out DIR", None, None, "out")
    out = Path(out)
    if out.exists() and not overwrite:
        raise TellInputError("output directory already exists (pass --overwrite to replace it)", out)
    return out


@contextmanager
def staged_output(out: str | Path, overwrite: bool = False):
    """Yield `<out>.partial` to write into; rename it to `out` only if the block completes."""
    out = check_output(out, overwrite)
    partial = out.with_name(out.name + ".partial")
    try:
        partial.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
    except OSError as err:
        raise TellInputError(f"cannot write the output directory: {err.strerror}", out) from None
    try:
        yield partial
    except BaseException:
        from tell.checkpoint import has_checkpoint
        if not has_checkpoint(partial):  # keep a resumable run; drop anything else
            shutil.rmtree(partial, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    partial.rename(out)


def check_single_process(verb: str) -> None:
    """Raise when a verb other than `train` is launched on several processes (accelerate, torchrun): its ranks
    would all write the same output directory and cache entries."""
    import os
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and verb != "train":
        raise TellInputError(f"tell {verb} runs in one process, and it was launched on {world}: the processes "
                             "would write the same directory. Run it without accelerate/torchrun (it uses one "
                             "GPU); `tell train` is the verb that splits its batches across processes")


def announce(cfg: RunConfig) -> None:
    """Print every value that differs from the defaults (what this run changed)."""
    changed = non_default_values(cfg)
    if changed:
        print("[tell] settings: " + ", ".join(f"{k}={v!r}" for k, v in changed.items()), file=sys.stderr)


def run_mix(cfg: RunConfig, overwrite: bool = False) -> Path:
    """Write the mix (mix.jsonl, manifest.json, config.yaml) to cfg.out; return the directory."""
    announce(cfg)
    check_output(cfg.out, overwrite)
    prepared = prepare_mix(cfg)
    print(f"[tell] mix: {describe_mix(prepared.mix.manifest)}", file=sys.stderr)
    with staged_output(cfg.out, overwrite) as tmp:
        write_mix(prepared.mix, tmp)
        dump_config(cfg, tmp / "config.yaml")
    return Path(cfg.out)


def run_train(cfg: RunConfig, overwrite: bool = False, task_examples=None, general_examples=None,
              prepared: PreparedMix | None = None):
    """Mix (unless `prepared`), load the model, train LoRA and write a complete run directory; return the
    TrainResult."""
    from tell.model import check_quantize
    from tell.trackers import check_tracker
    from tell.train import dist_context, train_lora
    check_quantize(cfg.model)
    rank, _ = dist_context()
    if rank == 0:
        announce(cfg)
        check_tracker(cfg.train.report_to)
        check_output(cfg.out, overwrite)
    prepared = prepared or prepare_mix(cfg, task_examples, general_examples)
    if rank != 0:  # other ranks train their share of each batch; rank 0 alone writes the run
        import tempfile
        model, _ = load_model(cfg.model)
        with tempfile.TemporaryDirectory() as scratch:
            train_lora(model, prepared.tokenizer, prepared.mix, cfg.train, scratch,
                       autocast_dtype(cfg.model, pick_device(cfg.model)))
        return None
    print(f"[tell] mix: {describe_mix(prepared.mix.manifest)}", file=sys.stderr)
    with staged_output(cfg.out, overwrite) as tmp:
        write_mix(prepared.mix, tmp)
        dump_config(cfg, tmp / "config.yaml")
        (tmp / "anchor.txt").write_text(prepared.anchor, encoding="utf-8")
        model, _ = load_model(cfg.model)
        autocast = autocast_dtype(cfg.model, pick_device(cfg.model))
        _, result = train_lora(model, prepared.tokenizer, prepared.mix, cfg.train, tmp, autocast,
                               run_config=_plain(cfg))
        dump_config(cfg, tmp / "config.yaml", runtime={"train": result.compute_path})
    return result


def _plain(cfg: RunConfig) -> dict:
    from tell.config import config_dict
    return config_dict(cfg)


def read_prompts(path: str | None) -> list[tuple[dict, ...]]:
    """Return prompt message lists from a JSONL/JSON file (any row shape, answer optional) or stdin lines."""
    from tell.data import read_records, record_to_messages
    if path in (None, "-"):
        lines = [line.strip() for line in sys.stdin if line.strip()]
        if not lines:
            raise TellInputError("no prompts on standard input", "<stdin>")
        return [({"role": "user", "content": line},) for line in lines]
    prompts = []
    for line, rec in read_records(path):
        messages = rec.get("messages")
        if isinstance(messages, list) and messages and isinstance(messages[-1], dict) \
                and messages[-1].get("role") != "assistant":
            rec = {**rec, "messages": messages + [{"role": "assistant", "content": ""}]}
        elif "instruction" in rec and "output" not in rec:
            rec = {**rec, "output": ""}  # a prompt-only row: the answer is what we generate
        elif not any(k in rec for k in ("response", "output", "messages", "conversations")):
            rec = {**rec, "response": ""}
        prompts.append(record_to_messages(rec, FieldMap(), path, line)[:-1])
    return prompts


def run_generate(run_dir: str | None, prompts_path: str | None, cfg: RunConfig, out_path: str | None = None,
                 use_anchor: bool = True) -> list[dict]:
    """Answer prompts with a trained run (its anchor applied) or a base model; return output rows."""
    from tell.generate import answer_texts, load_for_generation, prompt_texts, usable_backend
    prompts = read_prompts(prompts_path)
    cfg.generate.backend = usable_backend(cfg.generate.backend)
    run = load_for_generation(run_dir, cfg.model, cfg.generate.backend)
    texts = prompt_texts(run, prompts, use_anchor)
    outputs = answer_texts(run, texts, cfg.generate, cfg.generate.max_new_tokens or 256)
    rows = [{"prompt": list(p), "output": o} for p, o in zip(prompts, outputs)]
    if out_path:
        Path(out_path).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return rows


def task_from_config(cfg: RunConfig):
    """Return the Task named by cfg.eval (built-in, or a user task from --test/--metric)."""
    from tell.tasks import get_task
    return get_task(cfg.eval.task, test_file=cfg.eval.test or None, metric=cfg.eval.metric or None,
                    schema_file=cfg.eval.schema or None, pattern=cfg.eval.pattern or None,
                    train_file=cfg.data.task or None)


def test_rows_from_config(cfg: RunConfig, task) -> list:
    """Return the seeded sample of test rows that every arm is evaluated on."""
    return task.test_rows(cfg.eval.limit or None, cfg.eval.test_seed)


def run_eval(cfg: RunConfig, run_dir: str | None, overwrite: bool = False, use_anchor: bool = True):
    """Evaluate a run (base + adapter + its anchor) or a plain model on a task; write generations + metrics."""
    from tell.evaluate import evaluate, write_eval
    from tell.generate import load_for_generation, load_run_config, usable_backend
    announce(cfg)
    cfg.generate.backend = usable_backend(cfg.generate.backend)
    task = task_from_config(cfg)
    rows = test_rows_from_config(cfg, task)
    if run_dir:
        load_run_config(run_dir)  # fail on an unfinished run before the model loads
    out = cfg.out or (str(Path(run_dir) / f"eval-{task.name.replace(':', '-')}") if run_dir else "")
    with staged_output(out, overwrite) as tmp:
        dump_config(cfg, tmp / "config.yaml")
        run = load_for_generation(run_dir, cfg.model, cfg.generate.backend)
        result = evaluate(run, task, rows, cfg.generate, use_anchor)
        write_eval(result, tmp)
    return Path(out), result.metrics


def run_score(cfg: RunConfig, generations: str, out: str | None = None, run_dir: str | None = None) -> dict:
    """Recompute a task's metrics and diagnostics from a generations file (no model); write metrics.json if
    asked. The anchor and training targets come from `run_dir` (its anchor.txt and mix.jsonl) or, without
    it, from those files beside the generations file or one level up (where `tell eval --run` writes)."""
    from tell.evaluate import score_generations, training_targets
    if run_dir and not (Path(run_dir) / "anchor.txt").is_file():
        raise TellInputError("not a run directory (no anchor.txt)", run_dir)
    folders = [Path(run_dir)] if run_dir else [Path(generations).parent, Path(generations).parent.parent]
    anchor_file = next((f / "anchor.txt" for f in folders if (f / "anchor.txt").is_file()), None)
    targets = next((t for t in map(training_targets, folders) if t is not None), None)
    anchor = anchor_file.read_text(encoding="utf-8") if anchor_file else None
    metrics = score_generations(task_from_config(cfg), generations, anchor, targets)
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n", encoding="utf-8")
    return metrics


def run_export(cfg: RunConfig, rows: int, out_path: str) -> int:
    """Write `rows` seeded training rows of a built-in task as chat JSONL; return how many were written."""
    task = task_from_config(cfg)
    examples = task.train_examples(rows or None, cfg.mix.seed)
    with open(out_path, "w", encoding="utf-8") as f:
        for e in examples:
            f.write(json.dumps({"messages": list(e.messages)}, ensure_ascii=False) + "\n")
    return len(examples)


def run_export_model(run_dir: str, out: str, fmt: str = "hf", gguf_type: str = "auto",
                     overwrite: bool = False) -> list[str]:
    """Export a finished run (base + merged adapter, anchor, README) to `out` as a transformers directory or a
    GGUF; return the files written. Everything is checked before the weights load."""
    from tell.export import check_export, export_model
    check_export(run_dir, fmt, gguf_type)
    check_output(out, overwrite)
    with staged_output(out, overwrite) as tmp:
        return export_model(run_dir, tmp, fmt, gguf_type)
