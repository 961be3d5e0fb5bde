"""Pretrained models and training datasets from a Hugging Face hub id, a local path or the cache.

A study either builds its own base model (the embedded default: a small Llama pretrained on the
generated corpora) or starts from a pretrained one (``model.pretrained``), and trains either on
the embedded corpora or on datasets named in ``data.hub``. This module finds those models and
datasets, loads them, and renders dataset rows into the records the tokenizer reads.

Rules
-----
Where a model or dataset comes from (:func:`locate`), first match wins
    1. ``local``: the name is an existing folder (``~`` expanded). A name that looks like a
       path (starts with ``/``, ``.`` or ``~``) but is not a folder is an error. For a
       dataset, a ``datasets`` builder name (``json``, ``parquet``, ...) with ``data_files``
       is local too.
    2. ``cache``: the repository is in the Hugging Face hub cache (``HF_HUB_CACHE``, else
       ``HF_HOME/hub``) with a snapshot holding the files it needs (a model: ``config.json``
       and ``*.safetensors``; a dataset: any file). ``revision`` picks ``refs/REVISION`` or a
       snapshot named by that commit; without it ``refs/main``, else the newest snapshot. The
       snapshot is then read as a local folder (``datasets`` does not read the hub cache
       offline).
    3. ``hub``: the hub answers (:func:`learnforget.core.hub.hub_reachable`); the job downloads.
    Anything else raises :class:`SourceUnavailable`, one line naming the config key, the id
    and how to provide it. The pipeline calls :func:`check_available` while it builds the DAG,
    so an offline run stops before any job starts; a dry run only warns.

The base model folder (:func:`fetch_model`)
    ``results/base/model`` of a pretrained model holds symbolic links to the files of the
    located folder (config, weights, tokenizer), never copies, plus a ``manifest.json`` with
    their sha256 (:mod:`learnforget.core.integrity` checks it before every use) and where they came
    from. Only ``safetensors`` weights are accepted.

Dataset rows (:func:`render_records`), in this order
    - A template field missing from the *first* row is a configuration error naming the key
      (``data.hub.NAME.prompt``), the field and the row's columns: a typo would drop every row.
    - A row missing a template field, or whose field is not a string or number: dropped,
      counted as ``missing field``.
    - Text that is not valid UTF-8 (lone surrogates from a bad decode): dropped, ``not UTF-8``.
    - A rendered text (CPT) or response (IFT) that is empty or only whitespace: dropped,
      ``empty``.
    - With an ``id`` template, a row whose id was seen before: dropped, ``duplicate id`` (the
      first occurrence is kept). Without one, rows get their position as id.
    - ``max_records`` and then ``token_budget`` stop the stream: the token budget counts the
      tokens of the kept records (prompt and response for IFT) with the study's tokenizer and
      stops after the record that reaches it.
    - Sequences longer than the context are not dropped here: CPT text is cut into windows,
      and IFT examples are truncated to the run's ``seq_len`` at training (learnforget.data.tokens).
    - Nothing kept at the end is an error naming the dataset and the counts.
    The counts are logged and returned.
"""

from __future__ import annotations

import json
import os
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

from learnforget.core import hub
from learnforget.core.io import atomic_path, sha256_file, write_json

#: Files of a model repository the pipeline uses (weights as safetensors only).
MODEL_FILES = ("config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
               "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
               "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json")

#: Model types whose linear layers carry the Llama names the methods target (learnforget.train.methods).
LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3")

#: Architecture keys read from a pretrained model's config.json (learnforget.train.modeling.ARCH_DEFAULTS).
ARCH_FROM_HF = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings", "rope_theta", "tie_word_embeddings",
                "rms_norm_eps", "vocab_size")


class SourceUnavailable(Exception):
    """A configured model or dataset cannot be read here; ``str()`` is one line."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))


@dataclass(frozen=True)
class Located:
    """Where a model or dataset is: ``kind`` local, cache, builder or hub; ``path`` the folder
    to read (None for hub and builder); ``revision`` the snapshot's commit when cached."""

    kind: str
    path: Path | None = None
    revision: str | None = None


# ----------------------------------------------------------------------------- locating
def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", ".", "~"))


def _model_complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def locate(name: str, repo_type: str, *, key: str, revision: str | None = None,
           reachable: Callable[[], bool] = hub.hub_reachable, data_files: Any = None) -> Located:
    """Where the model or dataset ``name`` is (see the module rules); ``key`` is the config key
    named in errors."""
    what = "model" if repo_type == "model" else "dataset"
    if repo_type == "dataset" and name in hub.LOCAL_BUILDERS:
        if not data_files:
            raise SourceUnavailable(f"{key}: the {name!r} builder reads local files: give data_files")
        return Located("builder")
    folder = Path(name).expanduser()
    if folder.is_dir():
        if repo_type == "model" and not _model_complete(folder):
            raise SourceUnavailable(f"{key}: {name} is a folder without config.json and *.safetensors weights")
        return Located("local", folder)
    if _looks_like_path(name):
        raise SourceUnavailable(f"{key}: {name} is not a folder")
    needs = _model_complete if repo_type == "model" else None
    snap = hub.cached_snapshot(name, repo_type, revision, needs)
    if snap is not None:
        return Located("cache", snap, snap.name)
    if reachable():
        return Located("hub")
    where = hub.hub_cache_dir()
    fetch = f"hf download {'--repo-type dataset ' if repo_type == 'dataset' else ''}{name}"
    raise SourceUnavailable(
        f"{key}: the {what} {name!r}{' at revision ' + revision if revision else ''} is not a local folder, "
        f"not in the Hugging Face cache ({where}) and the hub is unreachable (offline): "
        f"run `{fetch}` where there is network (set HF_HOME to share the cache), "
        f"or set {key} to a local copy")


def model_source(model_cfg: Mapping[str, Any]) -> dict | None:
    """``{"pretrained", "revision"}`` of a pretrained model, or None (the study builds its own)."""
    if not model_cfg.get("pretrained"):
        return None
    return {"pretrained": str(model_cfg["pretrained"]), "revision": model_cfg.get("revision")}


def hub_datasets(cfg: Mapping[str, Any]) -> dict[str, dict]:
    """The token datasets read from a hub or local dataset: name -> its ``data.hub`` spec."""
    return dict(cfg.get("data", {}).get("hub", {}) or {})


def check_available(cfg: Mapping[str, Any], reachable: Callable[[], bool] = hub.hub_reachable,
                    datasets: Iterable[str] | None = None) -> dict[str, Located]:
    """Locate the pretrained model and every hub dataset the study trains on (``datasets``:
    the token datasets it needs; default all of ``data.hub``); SourceUnavailable on the first
    that cannot be read here."""
    found = {}
    src = model_source(cfg["model"])
    if src:
        found["model"] = locate(src["pretrained"], "model", key="model.pretrained",
                                revision=src["revision"], reachable=reachable)
    specs = hub_datasets(cfg)
    for name in sorted(specs if datasets is None else set(datasets) & set(specs)):
        spec = specs[name]
        found[f"data.hub.{name}"] = locate(spec["path"], "dataset", key=f"data.hub.{name}.path",
                                           revision=spec.get("revision"), reachable=reachable,
                                           data_files=spec.get("data_files"))
    return found


# ----------------------------------------------------------------------------- architecture
def arch_from_hf_config(hf: Mapping[str, Any], *, key: str = "model.pretrained") -> dict:
    """The architecture keys (and ``vocab_size``) of a transformers ``config.json``."""
    model_type = hf.get("model_type")
    if model_type not in LLAMA_LIKE:
        raise ValueError(f"{key}: model_type {model_type!r} is not supported: the methods target Llama-named "
                         f"linear layers (q_proj ... down_proj) of model types {', '.join(LLAMA_LIKE)}")
    arch = {k: hf[k] for k in ARCH_FROM_HF if hf.get(k) is not None}
    arch.setdefault("num_key_value_heads", arch.get("num_attention_heads"))
    return arch


def read_local_arch(model_cfg: Mapping[str, Any]) -> dict | None:
    """The architecture of a pretrained model from its ``config.json`` in a local folder or the
    hub cache, or None when neither has it (nothing is downloaded)."""
    src = model_source(model_cfg)
    if not src:
        return None
    folder = Path(src["pretrained"]).expanduser()
    if not folder.is_dir():
        if _looks_like_path(src["pretrained"]):
            raise ValueError(f"model.pretrained: {src['pretrained']} is not a folder")
        folder = hub.cached_snapshot(src["pretrained"], "model", src["revision"],
                                 needs=lambda p: (p / "config.json").is_file())
        if folder is None:
            return None
    if not (folder / "config.json").is_file():
        raise ValueError(f"model.pretrained: {folder} has no config.json")
    return arch_from_hf_config(json.loads((folder / "config.json").read_text(encoding="utf-8")))


def fetch_config_json(model_cfg: Mapping[str, Any]) -> dict | None:
    """Download a pretrained model's ``config.json`` into the hub cache (None when that fails:
    no network, a gated repository without a token)."""
    src = model_source(model_cfg)
    try:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(src["pretrained"], "config.json", revision=src["revision"])
    except Exception:  # noqa: BLE001 - any failure means "not known here"
        return None
    return arch_from_hf_config(json.loads(Path(path).read_text(encoding="utf-8")))


def resolve_arch(model_cfg: Mapping[str, Any], reachable: Callable[[], bool] = hub.hub_reachable) -> dict:
    """The architecture of a pretrained model: its config.json (local, cached, or downloaded
    when the hub answers), checked against the keys given in the config; the config's keys
    alone when the model is not available here. ValueError naming ``model.KEY`` otherwise."""
    given = {k: v for k, v in model_cfg.items() if k not in ("pretrained", "revision")}
    required = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    missing = [k for k in required if k not in given]
    read = read_local_arch(model_cfg)
    if read is None and missing and reachable():
        read = fetch_config_json(model_cfg)
    if read is None:
        if missing:
            raise ValueError(
                f"model: the architecture of {model_cfg['pretrained']!r} is unknown here (its config.json is not "
                f"local, not cached, and the hub is unreachable): give model.{', model.'.join(missing)} "
                f"or download the model")
        return given
    for k, v in given.items():
        if k in read and read[k] != v:
            raise ValueError(f"model.{k}: {v!r} in the config, but {model_cfg['pretrained']}'s config.json has {read[k]!r}")
    return {**read, **given}


# ----------------------------------------------------------------------------- the base model
def _matches(name: str) -> bool:
    from fnmatch import fnmatch

    return any(fnmatch(name, pattern) for pattern in MODEL_FILES)


def model_folder(pretrained: str, revision: str | None = None, *, reachable=hub.hub_reachable) -> Located:
    """A local folder holding the model: the located one, or a download into the hub cache."""
    found = locate(pretrained, "model", key="model.pretrained", revision=revision, reachable=reachable)
    if found.kind != "hub":
        return found
    from huggingface_hub import snapshot_download

    path = Path(snapshot_download(pretrained, revision=revision, allow_patterns=list(MODEL_FILES)))
    if not _model_complete(path):
        raise SourceUnavailable(f"model.pretrained: {pretrained} has no config.json and *.safetensors weights "
                                "(only safetensors are read)")
    return Located("hub", path, path.name)


def fetch_model(pretrained: str, revision: str | None, out_dir: str | os.PathLike, *,
                reachable=hub.hub_reachable, log: Callable[[str], object] = print) -> dict:
    """Write ``out_dir`` (the study's ``base/model``): links to the model's files and a manifest
    (see the module rules). Returns the manifest."""
    found = model_folder(pretrained, revision, reachable=reachable)
    folder = found.path.resolve() if found.kind == "local" else found.path
    files = sorted(p.name for p in folder.iterdir() if p.is_file() and _matches(p.name))
    log(f"base model {pretrained} ({found.kind}: {folder}): linking {len(files)} files")
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        hashes = {}
        for name in files:
            os.symlink(os.path.abspath(folder / name), tmp / name)
            hashes[name] = sha256_file(tmp / name)
        hf = json.loads((tmp / "config.json").read_text(encoding="utf-8"))
        manifest = {
            "kind": "pretrained",
            "pretrained": pretrained,
            "revision": revision,
            "source": found.kind,
            "folder": str(folder),
            "commit": found.revision,
            "arch": arch_from_hf_config(hf),
            "bytes": sum((folder / n).stat().st_size for n in files),
            "files": hashes,
        }
        write_json(tmp / "manifest.json", manifest)
    return manifest


# ----------------------------------------------------------------------------- datasets
@dataclass
class DropCounts:
    """Rows read and dropped by rule (see the module rules)."""

    read: int = 0
    kept: int = 0
    tokens: int = 0
    dropped: dict[str, int] = field(default_factory=lambda: {"missing field": 0, "not UTF-8": 0,
                                                              "empty": 0, "duplicate id": 0})
    stopped_by: str | None = None

    def as_dict(self) -> dict:
        return {"read": self.read, "kept": self.kept, "tokens": self.tokens, "dropped": dict(self.dropped),
                "stopped_by": self.stopped_by}


def template_fields(template: str) -> list[str]:
    """The top-level row fields a ``str.format`` template reads (``{a[b]}`` reads ``a``)."""
    names = []
    for _, name, _, _ in string.Formatter().parse(template):
        if name is None:
            continue
        top = name.split(".")[0].split("[")[0]
        if not top or top.isdigit():
            raise ValueError(f"template {template!r}: fields must be named ({{column}}), got {{{name}}}")
        if top not in names:
            names.append(top)
    return names


def templates(spec: Mapping[str, Any], regime: str) -> dict[str, str]:
    """The templates of a ``data.hub`` spec for ``regime``: ``{"text"}`` (cpt) or
    ``{"prompt", "response"}`` (ift); ``id`` too when given."""
    keys = ("text",) if regime == "cpt" else ("prompt", "response")
    out = {k: spec[k] for k in keys}
    if spec.get("id"):
        out["id"] = spec["id"]
    return out


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def render_records(rows: Iterable[Mapping[str, Any]], spec: Mapping[str, Any], regime: str, *, key: str,
                   count_tokens: Callable[[list[str]], list[int]] | None = None,
                   counts: DropCounts | None = None) -> Iterator[dict]:
    """Records (``{"id", "text"}`` or ``{"id", "prompt", "response"}``) from dataset rows, by
    the module rules; ``counts`` is filled as rows are read."""
    counts = counts if counts is not None else DropCounts()
    tpl = templates(spec, regime)
    fields = {k: template_fields(v) for k, v in tpl.items()}
    budget = spec.get("token_budget")
    limit = spec.get("max_records")
    seen: set[str] = set()
    first = True
    for row in rows:
        if limit is not None and counts.kept >= limit:
            counts.stopped_by = "max_records"
            return
        if budget is not None and counts.tokens >= budget:
            counts.stopped_by = "token_budget"
            return
        counts.read += 1
        if first:
            for k, names in fields.items():
                absent = [n for n in names if n not in row]
                if absent:
                    raise ValueError(f"{key}.{k}: field {absent[0]!r} is not a column of the dataset "
                                     f"(columns: {', '.join(map(str, row))})")
            first = False
        if any(not isinstance(row.get(n), (str, int, float)) or isinstance(row.get(n), bool)
               for names in fields.values() for n in names):
            counts.dropped["missing field"] += 1
            continue
        try:
            out = {k: v.format(**row) for k, v in tpl.items()}
        except (KeyError, IndexError, AttributeError, TypeError, ValueError):
            counts.dropped["missing field"] += 1
            continue
        if not all(_utf8(v) for v in out.values()):
            counts.dropped["not UTF-8"] += 1
            continue
        main = out["text"] if regime == "cpt" else out["response"]
        if not main.strip():
            counts.dropped["empty"] += 1
            continue
        rid = out.pop("id", None)
        if rid is not None:
            if rid in seen:
                counts.dropped["duplicate id"] += 1
                continue
            seen.add(rid)
        else:
            rid = str(counts.read - 1)
        if budget is not None and count_tokens is not None:
            counts.tokens += sum(count_tokens([out[k] for k in ("text", "prompt", "response") if k in out]))
        counts.kept += 1
        yield {"id": rid, **out}


def _local_json_files(found: Located, spec: Mapping[str, Any]) -> list[Path]:
    """The local JSON / JSON Lines files a dataset reads (none for hub or other formats)."""
    if found.kind == "builder":
        if spec["path"] != "json":
            return []
        files = spec["data_files"]
        files = [files] if isinstance(files, str) else (
            [f for v in files.values() for f in ([v] if isinstance(v, str) else v)] if isinstance(files, dict)
            else list(files))
        import glob

        return sorted(Path(p) for f in files for p in glob.glob(os.path.expanduser(f), recursive=True))
    if found.path is None:
        return []
    root = found.path / spec["data_dir"] if spec.get("data_dir") else found.path
    return sorted(p for p in root.rglob("*") if p.suffix in (".jsonl", ".json") and p.is_file()
                  and not p.name.startswith(".") and p.name not in ("dataset_info.json", "dataset_infos.json"))


def check_json_lines(files: Iterable[Path], *, key: str) -> None:
    """Reject a JSON Lines file holding bytes that are not UTF-8 or text that is not (a lone
    surrogate such as ``\\ud800``), naming the file and the line: ``datasets`` would fail on
    the whole file without saying where."""
    for path in files:
        if path.suffix != ".jsonl":
            continue
        with open(path, "rb") as fh:
            for n, raw in enumerate(fh, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise ValueError(f"{key}: {path} line {n}: not valid UTF-8 ({exc.reason} at byte "
                                     f"{exc.start})") from None
                if "\\u" in line:  # an escape may decode to a lone surrogate
                    try:
                        json.dumps(json.loads(line), ensure_ascii=False).encode("utf-8")
                    except UnicodeEncodeError:
                        raise ValueError(f"{key}: {path} line {n}: text that is not valid UTF-8 "
                                         "(a lone surrogate escape)") from None
                    except ValueError:
                        pass  # not JSON: datasets reports it


def load_rows(spec: Mapping[str, Any], *, key: str, reachable=hub.hub_reachable) -> Iterable[Mapping[str, Any]]:
    """The rows of a ``data.hub`` dataset through ``datasets.load_dataset`` (streamed when
    ``streaming``), shuffled when ``shuffle`` is set; a cached hub dataset is read from its
    snapshot folder."""
    import datasets

    found = locate(spec["path"], "dataset", key=f"{key}.path", revision=spec.get("revision"),
                   reachable=reachable, data_files=spec.get("data_files"))
    path = str(found.path) if found.path is not None else spec["path"]
    kwargs = {k: spec[k] for k in ("data_files", "data_dir") if spec.get(k)}
    if found.kind == "hub" and spec.get("revision"):
        kwargs["revision"] = spec["revision"]
    check_json_lines(_local_json_files(found, spec), key=key)
    try:
        ds = datasets.load_dataset(path, spec.get("name"), split=spec.get("split", "train"),
                                   streaming=bool(spec.get("streaming")), **kwargs)
    except Exception as exc:  # noqa: BLE001 - datasets raises many types; the message is what matters
        root = exc
        while root.__cause__ is not None:  # the innermost error says what is wrong
            root = root.__cause__
        raise ValueError(f"{key}: cannot load {spec['path']} ({type(root).__name__}: "
                         f"{' '.join(str(root).split())[:300]})") from exc
    shuffle = spec.get("shuffle")
    if shuffle:
        if spec.get("streaming"):
            ds = ds.shuffle(seed=int(shuffle["seed"]), buffer_size=int(shuffle["buffer_size"]))
        else:
            ds = ds.shuffle(seed=int(shuffle["seed"]))
    return ds


def build_dataset(spec: Mapping[str, Any], regime: str, out_file: str | os.PathLike, *, name: str,
                  tokenizer=None, reachable=hub.hub_reachable, log: Callable[[str], object] = print) -> dict:
    """Write the records of the ``data.hub.NAME`` dataset to ``out_file`` (JSONL, atomically);
    returns the counts. ``tokenizer`` counts tokens for ``token_budget``."""
    key = f"data.hub.{name}"
    rows = load_rows(spec, key=key, reachable=reachable)
    def count(texts: list[str]) -> list[int]:
        return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]

    if spec.get("token_budget") is not None and tokenizer is None:
        raise ValueError(f"{key}.token_budget needs the study's tokenizer")

    counts = DropCounts()
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        def tqdm(x, **_):
            return x
    with atomic_path(out_file) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for rec in tqdm(render_records(rows, spec, regime, key=key, count_tokens=count if tokenizer else None,
                                        counts=counts),
                        desc=name, unit=" records", mininterval=10, disable=None):
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
        if counts.kept == 0:
            raise ValueError(f"{key}: no records kept from {spec['path']} ({_describe(counts)})")
    log(f"{key}: {_describe(counts)}")
    return counts.as_dict()


def _describe(c: DropCounts) -> str:
    dropped = ", ".join(f"{v} {k}" for k, v in c.dropped.items() if v) or "none"
    out = f"{c.read} rows read, {c.kept} kept, dropped: {dropped}"
    if c.tokens:
        out += f"; {c.tokens} tokens"
    if c.stopped_by:
        out += f"; stopped by {c.stopped_by}"
    return out
