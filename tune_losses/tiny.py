"""The embedded offline default assets: real text, a tokenizer and a tiny teacher/student pair.

Everything the package's recipes, examples and tests need to run end to end without a network
or a downloaded checkpoint is built from what ships with Python and torchtune::

    python -m tune_losses.tiny [--out assets/tiny] [--force]

writes (``assets/`` is git-ignored)::

    assets/tiny/
      manifest.json          what was built, with sizes and sha256s (the idempotency check)
      data/train.jsonl       {"text": ...} per line, ~95% of the (deduplicated) documents
      data/heldout.jsonl     {"text": ...} per line, ~5% held out (the tokenizer never saw it)
      data/dpo_train.jsonl   preference pairs from the train documents (chosen / rejected messages)
      data/dpo_heldout.jsonl preference pairs from the held-out documents
      tokenizer.model        SentencePiece BPE, TINY_VOCAB_SIZE pieces, llama2 id layout
      teacher/model.pt       seeded random init of tiny_teacher(), torchtune checkpointer format
      student/model.pt       seeded random init of tiny_student(), torchtune checkpointer format

The text is ``pydoc_data.topics``: the ~465 KB of English reference documentation that
``help()`` prints, which is real prose (and some code) and present in every CPython install.
A second run checks each step against the manifest and skips those still valid.

In YAML configs the pieces are::

    tokenizer:
      _component_: tune_losses.tiny.tiny_tokenizer
      path: assets/tiny/tokenizer.model
      max_seq_len: 512
    model:
      _component_: tune_losses.tiny.tiny_student      # or tiny_teacher / lora_tiny_student
    checkpointer:
      _component_: torchtune.training.FullModelTorchTuneCheckpointer
      checkpoint_dir: assets/tiny/student
      checkpoint_files: [model.pt]
      model_type: LLAMA2
      output_dir: outputs/...                          # must not be inside checkpoint_dir
      # torchtune 0.6.1 quirk: to resume (should_load_recipe_state: true) a full fine-tune,
      # checkpoint_files must name the saved file relative to output_dir,
      # e.g. [epoch_0/model-00001-of-00001.bin]: it looks there, not in checkpoint_dir.
    dataset:
      _component_: torchtune.datasets.text_completion_dataset
      source: json
      data_files: assets/tiny/data/train.jsonl
      column: text
      split: train
      add_eos: true
      packed: false
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional

import torch

from tune_losses.extras import require_extra

require_extra("train", "tune_losses.tiny", ("torchtune", "sentencepiece"))

# The one vocabulary size: the tokenizer is trained to exactly this many pieces and every model
# builder below sizes its embedding and output projection with it, so they cannot disagree.
TINY_VOCAB_SIZE = 4096
TINY_MAX_SEQ_LEN = 512
DEFAULT_OUT = "assets/tiny"

# Bump when the layout or the meaning of an asset changes, so old builds are rebuilt.
_FORMAT_VERSION = 1
_SEED = 1234
_HELDOUT_FRACTION = 0.05
_MIN_DOC_CHARS = 200
_MAX_DOC_CHARS = 600


def _llama2_config(
    num_layers: int, num_heads: int, num_kv_heads: int, embed_dim: int, intermediate_dim: int
) -> Dict[str, int]:
    """torchtune's ``llama2(...)`` arguments at the one vocabulary size and sequence length."""
    return dict(
        vocab_size=TINY_VOCAB_SIZE,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        embed_dim=embed_dim,
        intermediate_dim=intermediate_dim,
        max_seq_len=TINY_MAX_SEQ_LEN,
    )


# Both models are llama2 (GQA, RoPE, SwiGLU, RMSNorm, untied output) at toy sizes: small enough
# that a forward+backward over a 512-token batch takes milliseconds on 2 CPU cores, big enough
# that the teacher is strictly larger than the student in depth and width.
TEACHER_CONFIG: Dict[str, int] = _llama2_config(
    num_layers=4, num_heads=8, num_kv_heads=4, embed_dim=256, intermediate_dim=768
)
STUDENT_CONFIG: Dict[str, int] = _llama2_config(
    num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=128, intermediate_dim=384
)

# llama2's id layout (torchtune's Llama2Tokenizer reads these from the model file, and sets its
# own pad id to 0 because llama2 has none), with llama2's lossless settings: no normalisation, no
# whitespace collapsing, digits split, unknown characters as bytes. Newlines never appear inside
# a training line, so they encode as the byte piece <0x0A>, exactly as in llama2.
_SPM_SETTINGS: Dict[str, Any] = dict(
    model_type="bpe",
    vocab_size=TINY_VOCAB_SIZE,
    unk_id=0,
    bos_id=1,
    eos_id=2,
    pad_id=-1,
    byte_fallback=True,
    character_coverage=1.0,
    split_digits=True,
    allow_whitespace_only_pieces=True,
    remove_extra_whitespaces=False,
    normalization_rule_name="identity",
    max_sentence_length=8192,
    # The corpus is ~7k lines; the cap only bounds the time if the source text ever grows.
    input_sentence_size=200_000,
    shuffle_input_sentence=False,
    num_threads=2,
)


# --------------------------------------------------------------------------- component builders


def tiny_teacher():
    """Return the tiny llama2 teacher (``TEACHER_CONFIG``, ~5.2M parameters), uninitialised.

    Weights come from ``assets/tiny/teacher/model.pt`` through the checkpointer, as in any
    torchtune recipe.
    """
    from torchtune.models.llama2 import llama2

    return llama2(**TEACHER_CONFIG)


def tiny_student():
    """Return the tiny llama2 student (``STUDENT_CONFIG``, ~1.4M parameters), uninitialised."""
    from torchtune.models.llama2 import llama2

    return llama2(**STUDENT_CONFIG)


def lora_tiny_student(
    lora_attn_modules: List[str],
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    lora_rank: int = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.0,
):
    """Return ``tiny_student()`` with LoRA adapters (torchtune's ``lora_llama2``).

    Its base weights have the same names as ``tiny_student()``'s, so ``student/model.pt`` loads
    into it with ``strict=False``, leaving only the ``lora_a``/``lora_b`` parameters missing.
    """
    from torchtune.models.llama2 import lora_llama2

    return lora_llama2(
        lora_attn_modules=lora_attn_modules,
        apply_lora_to_mlp=apply_lora_to_mlp,
        apply_lora_to_output=apply_lora_to_output,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        **STUDENT_CONFIG,
    )


def tiny_tokenizer(path: str, max_seq_len: Optional[int] = None, prompt_template=None):
    """Return torchtune's ``Llama2Tokenizer`` over the tiny SentencePiece model at ``path``.

    The prompt template defaults to none (not llama2's chat template) because the tiny models
    are plain text-completion models; pass one for chat-style datasets.
    """
    from torchtune.models.llama2 import llama2_tokenizer

    return llama2_tokenizer(path, max_seq_len=max_seq_len, prompt_template=prompt_template)


# --------------------------------------------------------------------------- the text


def _source_topics() -> Dict[str, str]:
    """Return ``pydoc_data.topics.topics``: topic name -> its documentation text."""
    from pydoc_data.topics import topics

    return topics


def _source_sha256(topics: Dict[str, str]) -> str:
    """Return a hash of the source text, so a different Python (different docs) rebuilds."""
    h = hashlib.sha256()
    for key in sorted(topics):
        h.update(key.encode())
        h.update(b"\0")
        h.update(topics[key].encode())
        h.update(b"\0")
    return h.hexdigest()


def _pieces(topic_text: str) -> List[str]:
    """Return the topic's paragraphs, long ones cut at line ends into parts <= _MAX_DOC_CHARS.

    Paragraphs keep their inner newlines and indentation: code blocks are indented, and the
    tokenizer round-trip is lossless, so the text stays as ``help()`` would print it.
    """
    out: List[str] = []
    for para in re.split(r"\n[ \t]*\n", topic_text):
        para = para.strip("\n")
        if not para.strip():
            continue
        if len(para) <= _MAX_DOC_CHARS:
            out.append(para)
            continue
        part: List[str] = []
        for line in para.split("\n"):
            if part and len("\n".join(part + [line])) > _MAX_DOC_CHARS:
                out.append("\n".join(part))
                part = []
            part.append(line)
        if part:
            out.append("\n".join(part))
    return out


def split_documents(topics: Dict[str, str]) -> List[str]:
    """Return the documents: consecutive paragraphs of one topic, grouped to ~200-600 chars.

    Documents never span two topics. A group is closed once it holds at least _MIN_DOC_CHARS and
    the next paragraph would take it past _MAX_DOC_CHARS; a short tail joins the topic's previous
    document. So almost all documents are 200-600 chars, a few longer, none shorter unless a
    whole topic is.
    """
    docs: List[str] = []
    for key in sorted(topics):  # sorted: dict order is not something to rely on for determinism
        topic_docs: List[str] = []
        cur: List[str] = []
        for piece in _pieces(topics[key]):
            joined = "\n\n".join(cur + [piece])
            if cur and len(joined) > _MAX_DOC_CHARS and len("\n\n".join(cur)) >= _MIN_DOC_CHARS:
                topic_docs.append("\n\n".join(cur))
                cur = [piece]
            else:
                cur.append(piece)
        if cur:
            tail = "\n\n".join(cur)
            if len(tail) < _MIN_DOC_CHARS and topic_docs:
                topic_docs[-1] = topic_docs[-1] + "\n\n" + tail
            else:
                topic_docs.append(tail)
        docs.extend(topic_docs)
    return docs


def train_heldout_split(docs: List[str], seed: int = _SEED) -> tuple[List[str], List[str]]:
    """Return ``(train, heldout)``: a seeded shuffle of ``docs``, the first ~5% held out.

    Shuffling before splitting spreads the held-out documents over all topics, so held-out
    loss measures generalisation to unseen paragraphs of familiar subjects. Exact duplicates
    (several topics repeat the same passage) are dropped first, so no held-out document is
    also a training document.
    """
    docs = list(dict.fromkeys(docs))  # dedupe, keeping first-seen order (deterministic)
    random.Random(seed).shuffle(docs)
    n_heldout = max(1, round(_HELDOUT_FRACTION * len(docs)))
    return docs[n_heldout:], docs[:n_heldout]


# Preference pairs: a document cut in two near its middle; the prompt is its first half, the chosen
# answer its own continuation, a rejected answer the continuation of another document of the same
# split (both answers trimmed to about the same length, so length alone tells nothing).
_PAIR_PROMPT_CHARS = 240
_PAIR_ANSWER_CHARS = 160
_PAIRS_PER_TRAIN_DOC = 1
_PAIRS_PER_HELDOUT_DOC = 3  # three rejected answers per held-out document: ~120 held-out pairs


def _trim_words(text: str, limit: int, from_end: bool = False) -> str:
    """``text`` cut to at most ``limit`` characters at a whitespace (its tail when ``from_end``)."""
    if len(text) <= limit:
        return text
    if from_end:
        cut = text[-limit:]
        space = cut.find(" ")
        return (cut[space + 1 :] if 0 <= space < limit // 2 else cut).strip()
    cut = text[:limit]
    space = cut.rfind(" ")
    return (cut[:space] if space > limit // 2 else cut).strip()


def preference_pairs(docs: List[str], pairs_per_doc: int, seed: int = _SEED) -> List[Dict[str, Any]]:
    """Return ``{"chosen": messages, "rejected": messages}`` rows for torchtune's ``preference_dataset``.

    Each document is cut at the space nearest its middle: the user message is (the end of) its first
    half, the chosen assistant message its own continuation, each rejected one the continuation of
    another document of ``docs`` (``pairs_per_doc`` different ones, seeded).
    """
    halves = []
    for doc in docs:
        middle = len(doc) // 2
        left, right = doc.rfind(" ", 0, middle), doc.find(" ", middle)
        cut = left if right < 0 or (left >= 0 and middle - left <= right - middle) else right
        cut = middle if cut <= 0 else cut
        halves.append(
            (
                _trim_words(doc[:cut].strip(), _PAIR_PROMPT_CHARS, from_end=True),
                _trim_words(doc[cut:].strip(), _PAIR_ANSWER_CHARS),
            )
        )
    rng = random.Random(seed)
    rows = []
    for i, (prompt, answer) in enumerate(halves):
        others = [
            j
            for j in rng.sample(range(len(halves)), min(len(halves), pairs_per_doc + 3))
            if j != i and halves[j][1] != answer
        ][:pairs_per_doc]
        for j in others:
            user = {"role": "user", "content": prompt}
            rows.append(
                {
                    "chosen": [user, {"role": "assistant", "content": answer}],
                    "rejected": [user, {"role": "assistant", "content": halves[j][1]}],
                }
            )
    return rows


# --------------------------------------------------------------------------- file helpers


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _file_record(out: Path, rel: str) -> Dict[str, Any]:
    """Return ``{"bytes", "sha256"}`` of ``out/rel``: what the manifest checks a file against."""
    p = out / rel
    return {"bytes": p.stat().st_size, "sha256": _sha256(p)}


def _write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file, so an interrupted run leaves no half file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _jsonl(texts: Iterable[str]) -> bytes:
    return "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts).encode()


def read_jsonl_texts(path: str | os.PathLike) -> List[str]:
    """Return the ``text`` field of every line of a ``{"text": ...}`` jsonl file."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


# --------------------------------------------------------------------------- the build steps
#
# Each step returns ``(files, info)``: the paths it wrote (relative to ``out``) and facts worth
# recording. Its *spec* (what it depends on) is stored in the manifest beside the files' hashes;
# a step is skipped when both still match, so changing a setting or an input rebuilds exactly
# the steps downstream of it.


def _build_data(out: Path) -> tuple[List[str], Dict[str, Any]]:
    train, heldout = train_heldout_split(split_documents(_source_topics()))
    _write_atomic(out / "data/train.jsonl", _jsonl(train))
    _write_atomic(out / "data/heldout.jsonl", _jsonl(heldout))
    info = {
        "train_docs": len(train),
        "heldout_docs": len(heldout),
        "train_chars": sum(map(len, train)),
        "heldout_chars": sum(map(len, heldout)),
    }
    return ["data/train.jsonl", "data/heldout.jsonl"], info


def _build_preferences(out: Path) -> tuple[List[str], Dict[str, Any]]:
    train = preference_pairs(read_jsonl_texts(out / "data/train.jsonl"), _PAIRS_PER_TRAIN_DOC, _SEED)
    heldout = preference_pairs(read_jsonl_texts(out / "data/heldout.jsonl"), _PAIRS_PER_HELDOUT_DOC, _SEED + 1)
    rows = lambda pairs: "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs).encode()  # noqa: E731
    _write_atomic(out / "data/dpo_train.jsonl", rows(train))
    _write_atomic(out / "data/dpo_heldout.jsonl", rows(heldout))
    return ["data/dpo_train.jsonl", "data/dpo_heldout.jsonl"], {
        "train_pairs": len(train),
        "heldout_pairs": len(heldout),
    }


def _build_tokenizer(out: Path) -> tuple[List[str], Dict[str, Any]]:
    import sentencepiece as spm

    # One training sentence per non-empty line: SentencePiece is line-oriented, and lines keep
    # their indentation so whitespace pieces ("▁▁▁") are learned for the indented code blocks.
    lines = [line for doc in read_jsonl_texts(out / "data/train.jsonl") for line in doc.split("\n") if line.strip()]
    spm.set_random_generator_seed(_SEED)
    # Train from an iterator into memory rather than from a file: a file path would be embedded
    # in the model's trainer spec, making the bytes depend on where the assets were built.
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf, minloglevel=2, **_SPM_SETTINGS)
    _write_atomic(out / "tokenizer.model", buf.getvalue())
    return ["tokenizer.model"], {"vocab_size": TINY_VOCAB_SIZE, "train_lines": len(lines)}


def _build_checkpoint(out: Path, name: str, builder: Callable, seed: int):
    """Save a seeded random init of ``builder()`` as ``out/name/model.pt``.

    torchtune 0.6.1's FullModelTorchTuneCheckpointer reads exactly one file, with plain
    ``torch.load`` (any name; ``.safetensors`` is the only suffix treated differently), and
    returns its contents as ``{"model": state_dict}``, so the file is the bare state dict.
    """
    torch.manual_seed(seed)
    model = builder()
    state_dict = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    _write_atomic(out / name / "model.pt", buf.getvalue())
    return [f"{name}/model.pt"], {"num_params": sum(v.numel() for v in state_dict.values())}


def _steps(topics_sha: str) -> List[tuple[str, Dict[str, Any], Callable]]:
    """Return ``(name, spec, build)`` for each step, in dependency order.

    The tokenizer's and the preference pairs' specs are completed at run time with the hashes of the
    data files they read.
    """
    return [
        (
            "data",
            {
                "source": "pydoc_data.topics",
                "source_sha256": topics_sha,
                "seed": _SEED,
                "heldout_fraction": _HELDOUT_FRACTION,
                "doc_chars": [_MIN_DOC_CHARS, _MAX_DOC_CHARS],
            },
            _build_data,
        ),
        ("tokenizer", {"settings": _SPM_SETTINGS, "seed": _SEED}, _build_tokenizer),
        (
            "preferences",
            {
                "seed": _SEED,
                "prompt_chars": _PAIR_PROMPT_CHARS,
                "answer_chars": _PAIR_ANSWER_CHARS,
                "pairs_per_doc": [_PAIRS_PER_TRAIN_DOC, _PAIRS_PER_HELDOUT_DOC],
            },
            _build_preferences,
        ),
        (
            "teacher",
            {"builder": "llama2", "config": TEACHER_CONFIG, "seed": _SEED},
            lambda out: _build_checkpoint(out, "teacher", tiny_teacher, _SEED),
        ),
        (
            "student",
            {"builder": "llama2", "config": STUDENT_CONFIG, "seed": _SEED + 1},
            lambda out: _build_checkpoint(out, "student", tiny_student, _SEED + 1),
        ),
    ]


def _step_valid(out: Path, entry: Optional[Dict[str, Any]], spec: Dict[str, Any]) -> bool:
    """Return whether a manifest entry has this spec and all its files still match on disk."""
    if not entry or entry.get("spec") != spec:
        return False
    for rel, rec in entry.get("files", {}).items():
        p = out / rel
        if not p.is_file() or p.stat().st_size != rec["bytes"] or _sha256(p) != rec["sha256"]:
            return False
    return bool(entry.get("files"))


def build(out: str | os.PathLike = DEFAULT_OUT, force: bool = False, verbose: bool = True) -> Dict[str, Any]:
    """Build (or validate) the tiny assets under ``out`` and return the manifest.

    Offline and deterministic up to SentencePiece/torch versions. Steps whose manifest entry is
    still valid (same spec, same file bytes) are skipped unless ``force``. The returned manifest
    (also written to ``out/manifest.json``) has per-step ``built``: whether this call rebuilt it.
    """
    t_start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / "manifest.json"
    old: Dict[str, Any] = {}
    if manifest_path.is_file() and not force:
        try:
            old = json.loads(manifest_path.read_text())
        except (json.JSONDecodeError, OSError):
            old = {}  # a corrupt manifest just means: rebuild everything
    old_steps = old.get("steps", {}) if old.get("format") == _FORMAT_VERSION else {}

    topics_sha = _source_sha256(_source_topics())
    steps: Dict[str, Any] = {}
    manifest: Dict[str, Any] = {}
    for name, spec, fn in _steps(topics_sha):
        if name in ("tokenizer", "preferences"):
            spec = dict(spec, train_sha256=steps["data"]["files"]["data/train.jsonl"]["sha256"])
        if name == "preferences":
            spec = dict(spec, heldout_sha256=steps["data"]["files"]["data/heldout.jsonl"]["sha256"])
        spec = json.loads(json.dumps(spec))  # normalise (tuples -> lists) to compare with JSON
        entry = old_steps.get(name)
        t0 = time.perf_counter()
        if not force and _step_valid(out, entry, spec):
            assert entry is not None  # a valid step has a manifest entry
            steps[name] = dict(entry, built=False)
            if verbose:
                print(f"[tiny] {name}: up to date, skipped ({', '.join(entry['files'])})")
            continue
        files, info = fn(out)
        seconds = time.perf_counter() - t0
        steps[name] = {
            "spec": spec,
            "files": {rel: _file_record(out, rel) for rel in files},
            "info": info,
            "seconds": round(seconds, 2),
            "built": True,
        }
        if verbose:
            print(f"[tiny] {name}: built {', '.join(files)} in {seconds:.1f}s {info}")
        manifest = _manifest(out, steps)
        # Written after every step, so an interrupted build resumes where it stopped.
        _write_atomic(manifest_path, json.dumps(manifest, indent=2).encode())

    manifest = _manifest(out, steps)
    _write_atomic(manifest_path, json.dumps(manifest, indent=2).encode())
    if verbose:
        n_built = sum(s["built"] for s in steps.values())
        print(f"[tiny] {out}: {n_built} of {len(steps)} steps built, {time.perf_counter() - t_start:.1f}s total")
    return manifest


def _manifest(out: Path, steps: Dict[str, Any]) -> Dict[str, Any]:
    """Return the manifest: the step records plus the facts configs need, in one place."""
    paths = {
        "train": "data/train.jsonl",
        "heldout": "data/heldout.jsonl",
        "dpo_train": "data/dpo_train.jsonl",
        "dpo_heldout": "data/dpo_heldout.jsonl",
        "tokenizer": "tokenizer.model",
        "teacher_dir": "teacher",
        "student_dir": "student",
        "checkpoint_file": "model.pt",
    }
    return {
        "format": _FORMAT_VERSION,
        "root": str(out),
        "python": sys.version.split()[0],
        "vocab_size": TINY_VOCAB_SIZE,
        "max_seq_len": TINY_MAX_SEQ_LEN,
        "paths": paths,
        "models": {
            "teacher": {"component": "tune_losses.tiny.tiny_teacher", **TEACHER_CONFIG},
            "student": {"component": "tune_losses.tiny.tiny_student", **STUDENT_CONFIG},
        },
        "steps": steps,
    }


def main(argv: Optional[List[str]] = None) -> int:
    """Command line: build the assets, print what was built and how long it took."""
    parser = argparse.ArgumentParser(
        prog="python -m tune_losses.tiny",
        description="Build the offline tiny assets (text, tokenizer, teacher/student checkpoints).",
    )
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT})")
    parser.add_argument("--force", action="store_true", help="rebuild every step")
    args = parser.parse_args(argv)
    build(args.out, force=args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
