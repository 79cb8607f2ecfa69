"""Stage 6 — export: ship a trained run as a model that other tools load without tell.

In: a finished run directory (config.yaml naming the base model, adapter/, anchor.txt). Out, into a directory:
``hf`` — the base with the LoRA adapter merged into its weights, in the base model's dtype, as a transformers
directory (config, safetensors, tokenizer and chat template, generation config carrying the run's sampling
settings) that ``AutoModelForCausalLM.from_pretrained`` and vLLM load; ``gguf`` — the same merged weights as
one GGUF file for llama.cpp/Ollama, written with the ``gguf`` package (Llama architecture with a byte-level
BPE tokenizer, as the embedded SmolLM2; other models are refused before any weights load). Both come with
the run's ``anchor.txt`` and a README.md that says how to prompt the model.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch

from tell.config import RunConfig
from tell.data import TellInputError
from tell.generate import load_run_config
from tell.model import embedded_gguf, quiet_peft, resolve_model_path

FORMATS = ("hf", "gguf")
# --gguf-type -> GGML tensor type of 2-D weights (1-D norms stay F32, as llama.cpp writes them); auto = base dtype
GGUF_TYPES = ("auto", "f32", "f16", "bf16", "q8_0")
GGUF_ARCHITECTURES = {"LlamaForCausalLM": "llama"}


def _base_path(cfg: RunConfig) -> Path | str:
    return resolve_model_path(cfg.model.name)


def _base_config(cfg: RunConfig):
    from transformers import AutoConfig
    return AutoConfig.from_pretrained(_base_path(cfg))


def base_dtype(config) -> torch.dtype:
    """Return the dtype the base model's weights are stored in (float32 when its config does not say)."""
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def check_export(run_dir: str | Path, fmt: str, gguf_type: str = "auto") -> RunConfig:
    """Return the run's config after checking that it can be exported as asked (before any weights load)."""
    if fmt not in FORMATS:
        raise TellInputError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}", field="format")
    if gguf_type not in GGUF_TYPES:
        raise TellInputError(f"--gguf-type {gguf_type!r} is not one of {', '.join(GGUF_TYPES)}", field="gguf_type")
    cfg = load_run_config(run_dir)
    if fmt == "gguf":
        config = _base_config(cfg)
        architecture = (getattr(config, "architectures", None) or ["?"])[0]
        if architecture not in GGUF_ARCHITECTURES:
            raise TellInputError(f"GGUF export supports {', '.join(GGUF_ARCHITECTURES)} models; the base "
                                 f"{cfg.model.name!r} is {architecture} (export it with --format hf and convert it "
                                 "with llama.cpp's convert_hf_to_gguf.py)", field="format")
        rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
        if rope.get("rope_type", "default") != "default":
            raise TellInputError(f"GGUF export writes plain RoPE; the base uses {rope['rope_type']!r} scaling "
                                 "(export with --format hf)", field="format")
        if not _from_gguf(cfg):
            _tokenizer_fields(_load_tokenizer(cfg), config.vocab_size)  # refuses a tokenizer it cannot write
    return cfg


def merged_model(cfg: RunConfig, run_dir: str | Path):
    """Return the base model with the run's LoRA adapter merged into its weights, in the base's dtype, on CPU."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    dtype = base_dtype(_base_config(cfg))
    model = AutoModelForCausalLM.from_pretrained(_base_path(cfg), dtype=dtype)
    with quiet_peft():
        model = PeftModel.from_pretrained(model, str(Path(run_dir) / "adapter")).merge_and_unload()
    return model.eval()


def export_model(run_dir: str | Path, out_dir: str | Path, fmt: str = "hf", gguf_type: str = "auto") -> list[str]:
    """Write the merged model in `fmt` with anchor.txt and README.md into out_dir; return the files written."""
    cfg = check_export(run_dir, fmt, gguf_type)
    out_dir = Path(out_dir)
    model = merged_model(cfg, run_dir)
    if fmt == "hf":
        write_hf(model, cfg, out_dir)
    else:
        write_gguf(model, cfg, out_dir / "model.gguf", gguf_type)
    anchor = (Path(run_dir) / "anchor.txt").read_text(encoding="utf-8")
    (out_dir / "anchor.txt").write_text(anchor, encoding="utf-8")
    if (Path(run_dir) / "config.yaml").is_file():
        shutil.copy(Path(run_dir) / "config.yaml", out_dir / "tell_config.yaml")
    (out_dir / "README.md").write_text(readme_text(cfg, anchor, fmt, Path(run_dir).name), encoding="utf-8")
    return sorted(p.name for p in out_dir.iterdir())


def _load_tokenizer(cfg: RunConfig):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(_base_path(cfg))


def write_hf(model, cfg: RunConfig, out_dir: Path) -> None:
    """Write the merged model, its tokenizer (with chat template) and a generation config with the run's sampling."""
    generation = model.generation_config
    if cfg.generate.greedy:
        generation.update(do_sample=False, temperature=None, top_k=None, top_p=None)
    else:
        generation.update(do_sample=True, temperature=cfg.generate.temperature, top_k=cfg.generate.top_k,
                          top_p=cfg.generate.top_p)
    generation.repetition_penalty = cfg.generate.repetition_penalty
    model.save_pretrained(out_dir)
    _load_tokenizer(cfg).save_pretrained(out_dir)


# --- GGUF -------------------------------------------------------------------------------------

def _from_gguf(cfg: RunConfig) -> Path | None:
    """Return the GGUF file the base model was dequantised from, if it came from one."""
    if cfg.model.name in ("", "default"):
        return embedded_gguf()
    return Path(cfg.model.name).expanduser() if cfg.model.name.endswith(".gguf") else None


def _permute(weights: np.ndarray, heads: int) -> np.ndarray:
    # llama.cpp's Llama rotates interleaved pairs, HF rotates halves: llama.cpp's converter reorders q/k rows
    # so (transformers' GGUF loader undoes exactly this).
    return weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:]).swapaxes(1, 2) \
        .reshape(weights.shape)


def _ggml_type(gguf_type: str, dtype: torch.dtype):
    import gguf
    types = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
             "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}
    if gguf_type == "auto":
        gguf_type = {torch.float16: "f16", torch.bfloat16: "bf16"}.get(dtype, "f32")
    file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                  "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    return types[gguf_type], file_types[gguf_type]


def gguf_tensors(model, qtype) -> list[tuple[str, np.ndarray, object]]:
    """Return (GGUF name, data, GGML type) of every weight of a merged Llama model, q/k rows reordered."""
    import gguf
    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    tied = getattr(config, "tie_word_embeddings", False)
    out = []
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # a GGUF without output.weight reuses token_embd, as the tied model does
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise TellInputError(f"GGUF export does not know where the weight {hf_name!r} goes", field="format")
        data = tensor.detach().float().numpy()
        if hf_name.endswith("q_proj.weight"):
            data = _permute(data, config.num_attention_heads)
        elif hf_name.endswith("k_proj.weight"):
            data = _permute(data, config.num_key_value_heads)
        kind = qtype if data.ndim == 2 else gguf.GGMLQuantizationType.F32
        if kind == gguf.GGMLQuantizationType.Q8_0 and data.shape[-1] % 32:
            kind = gguf.GGMLQuantizationType.F16  # Q8_0 packs rows in blocks of 32, as llama.cpp falls back
        out.append((name, gguf.quants.quantize(data, kind), kind))
    return out


def write_gguf(model, cfg: RunConfig, path: Path, gguf_type: str = "auto") -> None:
    """Write the merged Llama model with its tokenizer and chat template as one GGUF file."""
    import gguf
    config = model.config
    qtype, file_type = _ggml_type(gguf_type, base_dtype(_base_config(cfg)))
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(Path(str(cfg.model.name)).name if cfg.model.name != "default" else "SmolLM2-135M-Instruct")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(file_type)
    source = _from_gguf(cfg)
    fields = _gguf_tokenizer_fields(source) if source else _tokenizer_fields(_load_tokenizer(cfg), config.vocab_size)
    for key, value, vtype, sub_type in fields:
        writer.add_key_value(key, value, vtype, sub_type)
    for name, data, kind in gguf_tensors(model, qtype):
        writer.add_tensor(name, data, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _gguf_tokenizer_fields(source: Path) -> list[tuple]:
    """Return the tokenizer.* fields of the GGUF the base came from, unchanged (tokens, merges, pre-tokenizer,
    special ids, chat template): llama.cpp then tokenizes the export exactly as it did the base."""
    from gguf import GGUFReader, GGUFValueType
    fields = []
    for key, field in GGUFReader(source).fields.items():
        if key.startswith("tokenizer."):
            array = field.types[0] == GGUFValueType.ARRAY
            fields.append((key, field.contents(), field.types[0], field.types[-1] if array else None))
    return fields


def _pre_tokenizer(spec: dict | None) -> str:
    """Return llama.cpp's name for a byte-level BPE pre-tokenizer, or '' when it is none tell knows."""
    steps = (spec or {}).get("pretokenizers", [spec] if spec else [])
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and "(?i:'s|'t|'re|'ve|'m|'ll|'d)" in json.dumps(steps[0].get("pattern")):
        return "llama-bpe"
    return ""


def _tokenizer_fields(tokenizer, vocab_size: int) -> list[tuple]:
    """Return the tokenizer.* GGUF fields of a byte-level BPE tokenizer (GPT-2, SmolLM, Llama-3 style)."""
    from gguf import GGUFValueType as T, TokenType
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    pre = _pre_tokenizer(spec.get("pre_tokenizer"))
    if spec.get("model", {}).get("type") != "BPE" or not pre:
        raise TellInputError("GGUF export writes byte-level BPE tokenizers (GPT-2, SmolLM, Llama-3 style); this "
                             "base's tokenizer is another kind (export with --format hf)", field="format")
    vocab = tokenizer.backend_tokenizer.get_vocab(with_added_tokens=True)
    tokens = [f"[PAD{i}]" for i in range(max(vocab_size, max(vocab.values()) + 1))]
    types = [TokenType.UNUSED] * len(tokens)
    for token, index in vocab.items():
        tokens[index], types[index] = token, TokenType.NORMAL
    for index, added in tokenizer.added_tokens_decoder.items():
        types[index] = TokenType.CONTROL if added.special else TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    ids = tokenizer("a")["input_ids"]
    fields = [("tokenizer.ggml.model", "gpt2", T.STRING, None), ("tokenizer.ggml.pre", pre, T.STRING, None),
              ("tokenizer.ggml.tokens", tokens, T.ARRAY, T.STRING),
              ("tokenizer.ggml.token_type", [int(t) for t in types], T.ARRAY, T.INT32),
              ("tokenizer.ggml.merges", merges, T.ARRAY, T.STRING),
              ("tokenizer.ggml.add_bos_token", bool(ids) and ids[0] == tokenizer.bos_token_id, T.BOOL, None)]
    for key, token_id in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                          ("unknown", tokenizer.unk_token_id), ("padding", tokenizer.pad_token_id)):
        if token_id is not None:
            fields.append((f"tokenizer.ggml.{key}_token_id", token_id, T.UINT32, None))
    if tokenizer.chat_template:
        fields.append(("tokenizer.chat_template", tokenizer.chat_template, T.STRING, None))
    return fields


# --- README -----------------------------------------------------------------------------------

def readme_text(cfg: RunConfig, anchor: str, fmt: str, run_name: str) -> str:
    """Return the exported folder's README: what it is, how to prompt it (anchor placement) and load it."""
    g = cfg.generate
    sampling = "greedy decoding" if g.greedy else (f"temperature {g.temperature}, top_k {g.top_k}, top_p {g.top_p}, "
                                                   f"repetition penalty {g.repetition_penalty}")
    if not anchor:
        prompting = "This run was trained without an anchor: send task inputs as plain user messages."
        build = 'messages = [{"role": "user", "content": task_input}]'
    elif cfg.anchor.placement == "system":
        prompting = ("Task rows were trained with the anchor (`anchor.txt`) as the **system message**. Put it there "
                     "for every task input; leave it out for general chat.")
        build = ('anchor = open("anchor.txt").read()\n'
                 'messages = [{"role": "system", "content": anchor}, {"role": "user", "content": task_input}]')
    else:
        prompting = ("Task rows were trained with the anchor (`anchor.txt`) **before the user's text**: the user "
                     "message is the anchor, a blank line, then the task input. Do the same for every task input; "
                     "leave it out for general chat.")
        build = ('anchor = open("anchor.txt").read()\n'
                 'messages = [{"role": "user", "content": anchor + "\\n\\n" + task_input}]')
    if fmt == "hf":
        load = ("```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
                "model = AutoModelForCausalLM.from_pretrained(\".\")\n"
                "tokenizer = AutoTokenizer.from_pretrained(\".\")\n"
                f"{build}\nids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, "
                "return_tensors=\"pt\", return_dict=True)\n"
                "print(tokenizer.decode(model.generate(**ids, max_new_tokens=256)[0][ids[\"input_ids\"].shape[1]:]))\n"
                "```\n\nvLLM: `vllm serve .` (or `LLM(model=\".\")`) serves it with the chat template; send the same "
                "messages. `generation_config.json` holds the run's sampling settings.\n")
    else:
        load = ("```bash\nllama-cli -m model.gguf -cnv --temp {t} --top-k {k} --top-p {p} --repeat-penalty {r}\n```\n\n"
                "The chat template is inside `model.gguf`; in the conversation, type the anchor, a blank line and "
                "the task input as one message (or use it as the system prompt if placement is `system`). "
                "Ollama: a Modelfile with `FROM ./model.gguf`. transformers reads it too: "
                "`AutoModelForCausalLM.from_pretrained(\".\", gguf_file=\"model.gguf\")`.\n"
                .format(t=g.temperature, k=g.top_k, p=g.top_p, r=g.repetition_penalty))
    return (f"# {run_name} — a TELL fine-tune, exported by `tell export-model`\n\n"
            f"Base model `{cfg.model.name}` with the run's LoRA adapter (r {cfg.train.lora_r}, alpha "
            f"{cfg.train.lora_alpha}, on {cfg.train.target_modules}) merged into its weights. "
            f"Format: {'transformers directory' if fmt == 'hf' else 'GGUF'}. `tell_config.yaml` is the run's "
            f"resolved config.\n\n## How to prompt it\n\n{prompting} Anchor placement: "
            f"`{cfg.anchor.placement}`. The run was evaluated with {sampling}.\n\n"
            f"```python\n{build}\n```\n\n## Load it\n\n{load}")
