"""Command line: `tell <verb>`; each verb parses flags into a RunConfig and calls one experiment function.

Precedence: defaults < `--config FILE.yaml` < flags. Short flags (`--ratio 100`) and dotted flags
(`--train.lr 2e-4`) set the same fields. Bad input ends with one clear message and exit code 2
(`--debug` shows the traceback).
"""
from __future__ import annotations

import argparse
import sys

from tell.config import RunConfig, load_config
from tell.data import TellInputError

# short flag -> (dotted config keys it sets, argparse options)
SHORT_FLAGS = {
    "--task": (("data.task",), {"help": "task rows: .json/.jsonl (Alpaca, prompt/response or chat shape)"}),
    "--general": (("data.general",), {"help": "general rows: built-in 'alpaca', 'alpaca+dpo', 'sharegpt', or a file"}),
    "--prompt-field": (("data.prompt_field",), {"help": "name of the prompt field in pair rows"}),
    "--response-field": (("data.response_field",), {"help": "name of the answer field in pair rows"}),
    "--anchor": (("anchor.text",), {"help": "anchor prompt put before every task row"}),
    "--anchor-file": (("anchor.file",), {"help": "read the anchor prompt from a file"}),
    "--anchor-placement": (("anchor.placement",), {"help": "user-prefix (default) or system"}),
    "--ratio": (("mix.ratio",), {"help": "general:task token ratio, a number or 'max' (default 10)"}),
    "--general-tokens": (("mix.general_tokens",), {"help": "general-token budget instead of --ratio (e.g. 1e6)"}),
    "--mode": (("mix.mode",), {"help": "tell (default), sft (task only), general (general only)"}),
    "--order": (("mix.order",), {"help": "random (default), spread, task-first, task-last"}),
    "--seed": (("mix.seed", "train.seed", "generate.seed"), {"type": int, "help": "seed of every stage (42)"}),
    "--count-tokenizer": (("mix.count_tokenizer",), {"help": "tokenizer to count tokens with (default: model's)"}),
    "--max-length": (("mix.max_length",), {"type": int, "help": "longest row in tokens (default: context)"}),
    "--on-long": (("mix.on_long",), {"help": "rows over max-length: error (default), truncate, skip"}),
    "--model": (("model.name",), {"help": "'default' (embedded SmolLM2-135M), HF id, directory or .gguf"}),
    "--dtype": (("model.dtype",), {"help": "auto (default: fp32 on CPU; bf16 on a GPU with it, else fp16), bf16, "
                                           "fp16 (GPUs without bf16: V100, T4; loss-scaled), fp32"}),
    "--quantize": (("model.quantize",), {"help": "none (default) or 4bit: the frozen base in 4-bit NF4 "
                                                 "(QLoRA; needs CUDA and bitsandbytes)"}),
    "--gradient-checkpointing": (("train.gradient_checkpointing",), {"action": "store_true", "default": None,
                                 "help": "recompute activations in backward: less memory, ~30%% more compute"}),
    "--device": (("model.device",), {"help": "auto (default), cpu, cuda"}),
    "--lr": (("train.lr",), {"type": float, "help": "learning rate (1e-4)"}),
    "--batch-size": (("train.batch_size",), {"type": int, "help": "rows per optimizer step (16)"}),
    "--epochs": (("train.epochs",), {"type": int, "help": "passes over the mix (1)"}),
    "--max-steps": (("train.max_steps",), {"type": int, "help": "stop after N optimizer steps"}),
    "--report-to": (("train.report_to",), {"help": "none, tensorboard, wandb, mlflow"}),
    "--save-every": (("train.save_every",), {"type": int, "help": "checkpoint every N steps (20; 0 = never)"}),
    "--micro-batch-tokens": (("train.micro_batch_tokens",), {"type": int, "help": "tokens per forward pass "
                             "(default 768 on CPU, 2048 on CUDA; the gradient is the same, larger is faster where "
                             "memory allows)"}),
    "--max-new-tokens": (("generate.max_new_tokens",), {"type": int, "help": "new tokens per answer"}),
    "--backend": (("generate.backend",), {"help": "generation backend: transformers (default) or vllm (GPU)"}),
    "--greedy": (("generate.greedy",), {"action": "store_true", "default": None, "help": "greedy decoding"}),
    "--out": (("out",), {"help": "output directory"}),
    "--anchor-mode": (("anchor.mode",), {"help": "manual (default), self-instruct (the model writes it), none"}),
    "--layer": (("probe.layer",), {"type": int, "help": "hidden-state layer to probe (-1 = the middle one)"}),
    "--rows": (("probe.rows",), {"type": int, "help": "task and general queries probed (64)"}),
}
# flags whose meaning is the task *name* (evaluation verbs), not the task *file* (mix/train)
EVAL_FLAGS = {
    "--task": (("eval.task",), {"help": "halu-cot-json (default), is-en-news:en-is, is-en-news:is-en, or a "
                                        "name for your own task given with --test and --metric"}),
    "--test": (("eval.test",), {"help": "user task: JSONL of prompt/answer rows to evaluate on"}),
    "--train": (("data.task",), {"help": "user task: JSONL of training rows (compare)"}),
    "--metric": (("eval.metric",), {"help": "user task metric: json-schema, exact, regex, chrf, bleu"}),
    "--schema": (("eval.schema",), {"help": "JSON schema file for --metric json-schema"}),
    "--pattern": (("eval.pattern",), {"help": "regular expression for --metric regex"}),
    "--limit": (("eval.limit",), {"type": int, "help": "seeded sample of N test rows (0 = all; default 100, compare 48)"}),
    "--task-rows": (("compare.task_rows",), {"type": int, "help": "task training rows (compare: 6; the paper: 15)"}),
    "--arms": (("compare.arms",), {"help": "comma list of base, base-anchor, sft, sft-matched, tell, general"}),
}
# `tell select`: the pool, how many rows and how they are chosen (its --seed is the selection's alone)
SELECT_FLAGS = {
    "--pool": (("data.select_pool",), {"help": "rows to choose from: .json/.jsonl, 'alpaca', 'alpaca+dpo' or a "
                                               "built-in task's training pool ('halu-cot-json')"}),
    "--k": (("select.k",), {"type": int, "help": "rows to choose"}),
    "--tokens": (("select.tokens",), {"type": int, "help": "instead of --k: rows up to this many tokens"}),
    "--method": (("data.select",), {"help": "kcenter (default: coverage), kmeans (representatives) or random"}),
    "--seed": (("select.seed",), {"type": int, "help": "seed of the selection (42)"}),
}
VERB_FLAGS = {
    "mix": ["--task", "--general", "--prompt-field", "--response-field", "--anchor", "--anchor-file",
            "--anchor-placement", "--ratio", "--mode", "--order", "--seed", "--count-tokenizer",
            "--max-length", "--on-long", "--model", "--out"],
    "generate": ["--backend", "--model", "--max-new-tokens", "--greedy", "--seed", "--dtype", "--device",
                 "--quantize"],
}
VERB_FLAGS["train"] = VERB_FLAGS["mix"] + ["--dtype", "--device", "--lr", "--batch-size", "--epochs",
                                           "--max-steps", "--report-to", "--save-every",
                                           "--micro-batch-tokens", "--quantize", "--gradient-checkpointing"]
VERB_FLAGS["eval"] = ["--backend", "--task", "--test", "--metric", "--schema", "--pattern", "--limit", "--model",
                      "--max-new-tokens", "--greedy", "--seed", "--dtype", "--device", "--quantize", "--out"]
VERB_FLAGS["export"] = ["--task", "--task-rows", "--seed"]
VERB_FLAGS["score"] = ["--task", "--test", "--metric", "--schema", "--pattern", "--out"]
VERB_FLAGS["compare"] = ["--task", "--test", "--train", "--metric", "--schema", "--pattern", "--limit",
                         "--task-rows", "--arms", "--ratio", "--anchor", "--anchor-file", "--anchor-placement",
                         "--general", "--order", "--model", "--seed", "--lr", "--batch-size", "--max-new-tokens",
                         "--greedy", "--dtype", "--device", "--count-tokenizer", "--max-length", "--on-long", "--out",
                         "--quantize", "--gradient-checkpointing", "--micro-batch-tokens"]

for _verb in ("mix", "train", "compare"):
    VERB_FLAGS[_verb] += ["--anchor-mode", "--general-tokens"]
VERB_FLAGS["select"] = ["--pool", "--k", "--tokens", "--method", "--model", "--seed", "--out", "--dtype", "--device",
                        "--prompt-field", "--response-field", "--count-tokenizer"]
VERB_FLAGS["probe"] = ["--task", "--test", "--metric", "--anchor", "--anchor-file", "--anchor-placement",
                       "--anchor-mode", "--general", "--model", "--dtype", "--device", "--layer", "--rows", "--out"]


def _flag_table(verb: str) -> dict:
    table = dict(SHORT_FLAGS)
    if verb in ("eval", "score", "compare", "export", "probe"):
        table.update(EVAL_FLAGS)
    if verb == "select":
        table.update(SELECT_FLAGS)
    return table


def _add_common(parser: argparse.ArgumentParser, verb: str) -> None:
    for flag in VERB_FLAGS[verb]:
        _, options = _flag_table(verb)[flag]
        parser.add_argument(flag, **{"default": None, **options})
    parser.add_argument("--config", help="YAML file with the same fields (flags override it)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tell", description="Token-Efficient Leverage Learning: "
                                     "anchor prompt + extensive shuffle + LoRA, for tasks with few examples.",
                                     epilog="Any config field can also be set as --section.field VALUE, "
                                     "e.g. --train.lr 2e-4 (see `tell train --print-config`).")
    verbs = parser.add_subparsers(dest="verb", required=True)
    mix = verbs.add_parser("mix", help="write the token-ratio mix (mix.jsonl + manifest.json) only")
    _add_common(mix, "mix")
    mix.add_argument("--allow-repeat", action="store_true", default=None, help="repeat general rows if needed")
    mix.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    mix.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    train = verbs.add_parser("train", help="mix on the fly and train a LoRA adapter into --out")
    _add_common(train, "train")
    train.add_argument("--allow-repeat", action="store_true", default=None, help="repeat general rows if needed")
    train.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    train.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    train.add_argument("--resume", metavar="DIR", help="continue a killed run of --out DIR from its checkpoint")
    gen = verbs.add_parser("generate", help="answer prompts with a trained run (its anchor applied)")
    gen.add_argument("--run", help="run directory written by `tell train` (omit to use --model alone)")
    gen.add_argument("--prompts", help="JSONL/JSON prompts (any row shape); '-' or omitted = stdin lines")
    gen.add_argument("--output", help="write {prompt, output} rows to this JSONL file")
    gen.add_argument("--no-anchor", action="store_true", help="do not apply the run's anchor")
    _add_common(gen, "generate")
    ev = verbs.add_parser("eval", help="generate answers to a task's test rows and score them")
    ev.add_argument("--run", help="run directory (base + adapter + its anchor); else --model alone")
    ev.add_argument("--no-anchor", action="store_true", help="do not apply the run's anchor")
    ev.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    ev.add_argument("--harness", metavar="TASKS", help="run lm-evaluation-harness TASKS (comma list) on the base "
                    "model and base + the run's adapter (needs lm-eval and a reachable hub)")
    _add_common(ev, "eval")
    score = verbs.add_parser("score", help="recompute metrics from a generations.jsonl (no model)")
    score.add_argument("--generations", required=True, help="generations.jsonl (needs output and reference)")
    score.add_argument("--run", help="run directory whose anchor.txt and mix.jsonl give anchor_copy_rate and "
                       "target_copy_rate (default: beside the generations file or one level up)")
    _add_common(score, "score")
    export = verbs.add_parser("export", help="write a built-in task's training rows as chat JSONL")
    export.add_argument("--output", required=True, help="JSONL file to write")
    _add_common(export, "export")
    compare = verbs.add_parser("compare", help="the main job: base vs SFT vs TELL (+ controls), with a report")
    compare.add_argument("--quick", action="store_true",
                         help="4 task rows, ratio 3, 16 test rows (3–6 min on 2 cores)")
    compare.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    compare.add_argument("--no-cache", action="store_true", help="recompute every arm")
    compare.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    _add_common(compare, "compare")
    select = verbs.add_parser("select", help="choose the k rows of a pool worth training on (k-center, k-means "
                              "or random over the model's own embeddings)")
    select.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    select.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    _add_common(select, "select")
    _add_sweep_verbs(verbs)
    ship = verbs.add_parser("export-model", help="merge a run's adapter into its base and write it as a "
                            "transformers directory or a GGUF (with the anchor and a README on prompting it)")
    ship.add_argument("--run", required=True, help="run directory written by `tell train`")
    ship.add_argument("--out", required=True, help="output directory")
    ship.add_argument("--format", default="hf", choices=["hf", "gguf"], help="hf (transformers/vLLM, default) "
                      "or gguf (llama.cpp/Ollama; Llama-architecture models)")
    ship.add_argument("--gguf-type", default="auto", choices=["auto", "f32", "f16", "bf16", "q8_0"],
                      help="GGUF weight type (auto = the base model's dtype; q8_0 is ~4x smaller than f32)")
    ship.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    ship.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def _add_sweep_verbs(verbs) -> None:
    sweep = verbs.add_parser("sweep", help="run a grid of compare cells once each (results in SQLite, resumable)")
    sweep.add_argument("--config", help="sweep YAML: base settings plus a grid: of axis -> values")
    sweep.add_argument("--status", action="store_true", help="show done / running / left and the time left")
    sweep.add_argument("--out", help="sweep directory (default: the YAML's out, else runs/sweep)")
    sweep.add_argument("--max-cells", type=int, help="run at most N cells now (the next call goes on)")
    sweep.add_argument("--stop-after", metavar="DURATION", help="stop after this long (2h, 90m, 600s): at the "
                       "first training checkpoint after it, or before the next cell (the next call goes on)")
    sweep.add_argument("--release-running", action="store_true", help="first run here the cells another host "
                       "left 'running' (a copied sweep folder, a renamed machine: only if no sweep runs there)")
    sweep.add_argument("--debug", action="store_true", help="show tracebacks")
    report = verbs.add_parser("report", help="render report.md + report.html (tables and plots) of a sweep "
                              "or compare directory")
    report.add_argument("dir", help="a sweep directory (sweep.sqlite) or a compare directory (results.json)")
    report.add_argument("--metric", help="render a sweep on another metric of its cells (e.g. "
                        "json_adherence_lenient), into DIR/by-METRIC/; intervals then cover seeds only")
    report.add_argument("--debug", action="store_true", help="show tracebacks")
    probe = verbs.add_parser("probe", help="t-SNE + separation numbers of task queries with/without the anchor "
                             "vs general queries, from hidden states")
    probe.add_argument("--run", help="run directory (base + adapter + its anchor); else --model with --anchor")
    probe.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    _add_common(probe, "probe")


def _dispatch_sweep(args, extra) -> int:
    """Run the sweep and report verbs (their YAML has a grid, so it is not read as one RunConfig)."""
    from tell import sweep
    from tell.sweep_eta import sweep_status
    from tell.sweep_report import status_text
    if args.verb == "report":
        path = sweep.render_report(args.dir, args.metric)
        print(f"[tell] {path} and {path.with_suffix('.html')} written (plots beside them)")
        return 0
    overrides = dotted_overrides(extra)
    overrides.update({"out": args.out} if args.out else {})
    overrides.update({"sweep.max_cells": args.max_cells} if args.max_cells is not None else {})
    overrides.update({"sweep.stop_after": args.stop_after} if args.stop_after is not None else {})
    if args.status:
        out = sweep.plan_sweep(args.config, overrides)[1] if args.config else (args.out or "runs/sweep")
        print(status_text(sweep_status(out)))
        return 0
    if not args.config:
        raise TellInputError("tell sweep needs --config FILE.yaml (base settings and a grid:), or --status")
    try:
        status = sweep.run_sweep(args.config, overrides, release=args.release_running)
    except KeyboardInterrupt:
        print("tell sweep: stopped; the cell it was running is left to run again (its training resumes from "
              "its last checkpoint): run the same command to go on", file=sys.stderr)
        return 130
    print(status_text(status))
    print(f"[tell] results in {status['out']}/sweep.sqlite; report in {status['out']}/report.md")
    return 0


def config_from_args(args: argparse.Namespace, extra: list[str]) -> RunConfig:
    """Return defaults < YAML < short flags < dotted flags as a validated RunConfig."""
    overrides = {}
    for flag, (keys, _) in _flag_table(args.verb).items():
        value = getattr(args, flag[2:].replace("-", "_"), None)
        if value is not None:
            overrides.update({k: value for k in keys})
    if getattr(args, "no_cache", False):
        overrides["compare.cache"] = False
    if getattr(args, "allow_repeat", None):
        overrides["mix.allow_repeat"] = True
    overrides.update(dotted_overrides(extra))
    if args.verb == "compare":
        from tell.compare import default_config
        return load_config(args.config, overrides, base=default_config())
    return load_config(args.config, overrides)


def dotted_overrides(extra: list[str]) -> dict[str, str]:
    """Return {'section.field': value} from leftover `--section.field value` arguments."""
    overrides, i = {}, 0
    while i < len(extra):
        arg = extra[i]
        if not arg.startswith("--") or "." not in arg:
            import difflib
            known, name = {**SELECT_FLAGS, **SHORT_FLAGS, **EVAL_FLAGS}, arg.partition("=")[0]
            if name in known:  # a real flag, but not one of this verb's short flags
                keys, options = known[name]
                value = " true" if options.get("action") == "store_true" else " VALUE"
                raise TellInputError(f"unrecognised argument {arg!r} here; give the config field as a dotted "
                                     f"flag: {' '.join(f'--{k}{value}' for k in keys)}")
            close = difflib.get_close_matches(arg, list(known), n=1)
            hint = f"; did you mean {close[0]}?" if close else " (see --help)"
            raise TellInputError(f"unrecognised argument {arg!r}{hint}")
        key, _, value = arg[2:].partition("=")
        if not value:
            if i + 1 >= len(extra):
                raise TellInputError(f"{arg} needs a value")
            value, i = extra[i + 1], i + 1
        overrides[key] = value
        i += 1
    return overrides


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    try:
        return _dispatch(args, extra)
    except TellInputError as err:
        if args.debug:
            raise
        print(f"tell {args.verb}: error: {err}", file=sys.stderr)
        return 2


def _dispatch(args, extra) -> int:
    from tell import experiment
    from tell.hardware import cap_threads_to_usable_cores
    from tell.resume import resume_train
    experiment.check_single_process(args.verb)
    cap_threads_to_usable_cores()
    if args.verb in ("sweep", "report"):
        return _dispatch_sweep(args, extra)
    if args.verb == "export-model":
        if extra:
            raise TellInputError(f"unrecognised argument {extra[0]!r} (see tell export-model --help)")
        files = experiment.run_export_model(args.run, args.out, args.format, args.gguf_type, args.overwrite)
        print(f"[tell] {args.format} export of {args.run} written to {args.out}: {', '.join(files)}")
        return 0
    cfg = config_from_args(args, extra)
    if getattr(args, "print_config", False):
        import yaml
        from tell.config import config_dict
        sys.stdout.write(yaml.safe_dump(config_dict(cfg), sort_keys=False))
        return 0
    if args.verb == "mix":
        out = experiment.run_mix(cfg, args.overwrite)
        print(f"[tell] mix written to {out}/mix.jsonl and {out}/manifest.json")
    elif args.verb == "train":
        result = resume_train(args.resume) if args.resume else experiment.run_train(cfg, args.overwrite)
        if result is None:  # a non-zero rank of a multi-process launch: rank 0 reports
            return 0
        print(f"[tell] run written to {args.resume or cfg.out}: {result.optimizer_steps} steps, "
              f"{result.trained_tokens} tokens in {result.wall_s:.0f} s ({result.tokens_per_s:.0f} tok/s)")
    elif args.verb == "generate":
        rows = experiment.run_generate(args.run, args.prompts, cfg, args.output, not args.no_anchor)
        if not args.output:
            import json
            for row in rows:
                print(json.dumps({"output": row["output"]}, ensure_ascii=False))
    elif args.verb == "eval" and args.harness:
        print(f"[tell] lm-eval results written to {experiment.run_harness(cfg, args.run, args.harness)}")
    elif args.verb == "probe":
        from tell.probe import run_probe
        numbers = run_probe(cfg, args.run, args.overwrite)
        print(_metrics_text({k: numbers[k] for k in ("layer", "without_anchor", "with_anchor")}))
        print(f"[tell] probe.png and probe.json written to {cfg.out or 'runs/probe'}")
    elif args.verb == "select":
        record = experiment.run_select(cfg, args.overwrite).record
        print(f"[tell] {record['k']} of {record['pool_rows']} rows chosen by {record['method']} ({record['chosen_tokens']} "
              f"tokens, coverage radius {record['coverage_radius']:.3f}) written to {cfg.out}; selection.json and "
              "selection.png beside it")
    elif args.verb == "eval":
        out, metrics = experiment.run_eval(cfg, args.run, args.overwrite, not args.no_anchor)
        print(_metrics_text(metrics))
        print(f"[tell] generations.jsonl and metrics.json written to {out}")
    elif args.verb == "export":
        written = experiment.run_export(cfg, cfg.compare.task_rows, args.output)
        print(f"[tell] {written} training rows of {cfg.eval.task} written to {args.output}")
    elif args.verb == "score":
        metrics = experiment.run_score(cfg, args.generations, cfg.out or None, args.run)
        print(_metrics_text(metrics))
    elif args.verb == "compare":
        from tell.compare import run_compare
        from tell.report import compare_table
        if not cfg.out:
            cfg.out = "runs/compare"
        results = run_compare(cfg, args.overwrite, args.quick)
        summary = results.pop("_summary")
        print(compare_table(results))
        print(f"[tell] {summary['wall_s']} s; report.md, compare.png and results.json in {cfg.out}")
    return 0


def _metrics_text(metrics: dict) -> str:
    import json
    return json.dumps({k: v for k, v in metrics.items() if k not in ("generation", "compute_path")}, indent=1)


if __name__ == "__main__":
    sys.exit(main())
