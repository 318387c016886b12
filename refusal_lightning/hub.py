"""Push adapter dirs to the Hugging Face Hub, one model repo per adapter, each with a model card.

``push`` (the CLI command) runs three steps:

1. :func:`plan_uploads` checks every adapter dir, name and repo name and parses every file the card is
   built from, with no network call; all problems are raised together as one :class:`PushValidationError`.
2. a dry run prints the plan (:func:`print_plan`) and stops;
3. otherwise :func:`push_adapters` creates or reuses each repo (``exist_ok=True``) and uploads the adapter
   files plus the card in one commit per adapter, so a repo never holds new weights with an old card.

The card is uploaded from memory, so the user's adapter dir is never modified. The token is read from the
environment (or the cached login), handed to :class:`huggingface_hub.HfApi` and nothing else: it is not
printed, logged, written to the card, or kept in error messages.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import CommitOperationAdd, HfApi, get_token
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import filter_repo_objects, validate_repo_id

from refusal_lightning import __version__
from refusal_lightning.model_card import (
    ADAPTER_CONFIG,
    CardInputs,
    is_placeholder_card,
    load_eval_summary,
    read_card_inputs,
    render_model_card,
)
from refusal_lightning.specs import split_spec

ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
CARD_NAME = "README.md"
DEFAULT_COMMIT_MESSAGE = "Upload adapter with refusal_lightning push"
# Shown in a dry run without --namespace: resolving the real one needs whoami(), a network call.
NAMESPACE_PLACEHOLDER = "<your-hf-username>"
# Not uploaded (huggingface_hub ignore patterns: fnmatch, `*` spans folders), by the reason a dry run shows.
SKIPPED = {
    "hidden file or folder": [".*", "*/.*"],
    "cache folder": ["__pycache__/*", "*/__pycache__/*"],
    # Lightning checkpoints hold the optimizer state and often the base weights: not an adapter.
    "Lightning checkpoint, not part of the adapter": ["*.ckpt"],
}
# Files up to this size are searched for the token before upload; weights are larger and never hold it.
MAX_SCANNED_BYTES = 16 * 2**20


class PushValidationError(ValueError):
    """Everything wrong with a push request, found before the first upload; one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        count = _count(len(problems), "problem")
        super().__init__(f"cannot push ({count}):\n" + "\n".join(f"  - {p}" for p in problems))


class HubPushError(RuntimeError):
    """An upload failed; says which adapters were pushed before it, with any credential redacted."""


@dataclass(frozen=True)
class UploadFile:
    """One file of a repo commit: read from disk (``source``) or generated in memory (``content``)."""

    path_in_repo: str
    size: int
    source: Path | None = None
    content: bytes | None = None
    note: str = ""


@dataclass
class AdapterUpload:
    """A checked adapter dir and where it goes; the card is rendered once the namespace is known."""

    name: str
    path: Path
    repo_name: str
    files: list[UploadFile]
    """Files taken from the adapter dir as they are."""
    skipped: list[tuple[str, str]]
    """``(path, reason)`` for what is in the dir but not uploaded."""
    card_inputs: CardInputs | None
    """None when the dir has its own README.md, which is then uploaded unchanged."""

    def repo_id(self, namespace: str) -> str:
        return f"{namespace}/{self.repo_name}"

    def commit_files(self, repo_id: str) -> list[UploadFile]:
        """Exactly what one commit sends: the dir's files, plus the generated card where there is one."""
        files = list(self.files)
        if self.card_inputs is not None:
            card = render_model_card(self.card_inputs, repo_id).encode("utf-8")
            files.append(UploadFile(CARD_NAME, len(card), content=card, note="generated model card"))
        return files


def push(
    adapter: list[str] | None = None,
    namespace: str | None = None,
    repo_template: str = "{name}",
    private: bool = False,
    dry_run: bool = False,
    eval_summary: str | None = None,
    commit_message: str = DEFAULT_COMMIT_MESSAGE,
    token_env: str = "HF_TOKEN",
) -> dict[str, str]:
    """Upload LoRA adapter dirs to the Hugging Face Hub, one model repo each, with a generated model card.

    Every adapter dir, name and repo name is checked before the first upload and all problems are reported
    together. Re-running updates the same repos (an existing repo's visibility is left as it is). The card
    (README.md) is built from adapter_config.json, config.yaml, data_stats.json and projection_stats.json
    in the dir, plus --eval_summary; a README.md you wrote yourself is uploaded instead.

    Args:
        adapter: Adapter to push as NAME=PATH, where PATH is a PEFT adapter dir (adapter_config.json +
            adapter_model.safetensors). For several, repeat '--adapter+ NAME=PATH' or give a list:
            --adapter '[a=dir1, b=dir2]'.
        namespace: Hub user or organization that owns the repos. Default: the user the token belongs to.
        repo_template: Repo name for each adapter; '{name}' is replaced by the adapter's NAME.
        private: Create new repos as private.
        dry_run: Print each repo id and every file that would be uploaded, with sizes, then stop. Makes no
            network call and needs no token.
        eval_summary: Path of an evaluation summary.json; its row for each adapter (the endpoint with the
            adapter's NAME, else all rows) goes into the model card.
        commit_message: Commit message used for every repo.
        token_env: Environment variable holding the Hub token; when unset, the cached login
            ('hf auth login') is used.

    Returns:
        Adapter name -> repo id.
    """
    problems: list[str] = []
    uploads = plan_uploads(adapter or [], repo_template, eval_summary, problems)
    if namespace is not None:
        problems += [f"--namespace {namespace!r} {reason}" for reason in repo_name_problems(namespace)]
    # A dry run reads only the environment: get_token() may do an OIDC exchange, a network call.
    token = (os.environ.get(token_env) or None) if dry_run else resolve_token(token_env, problems)
    if token is not None:
        problems += token_leaks(uploads, token, namespace or NAMESPACE_PLACEHOLDER)
    if problems:
        raise PushValidationError(problems)
    if dry_run:
        return print_plan(uploads, namespace=namespace, private=private)
    api = HfApi(token=token, library_name="refusal_lightning", library_version=__version__)
    return push_adapters(
        uploads, api=api, namespace=namespace, private=private, commit_message=commit_message
    )


def plan_uploads(
    specs: list[str], repo_template: str, eval_summary: str | None, problems: list[str]
) -> list[AdapterUpload]:
    """Check NAME=PATH specs and their dirs without touching the network; append every problem found."""
    if not specs:
        problems.append("no adapters given: pass --adapter NAME=PATH (repeatable)")
    evaluation = None
    if eval_summary is not None:
        try:
            evaluation = load_eval_summary(Path(eval_summary).expanduser())
        except ValueError as err:
            problems.append(str(err))
    template_ok = True
    try:
        repo_template.format(name="x")
    except (KeyError, IndexError, ValueError) as err:
        problems.append(f"--repo_template {repo_template!r}: only {{name}} may be used ({err!r})")
        template_ok = False

    uploads: list[AdapterUpload] = []
    names: dict[str, int] = {}
    repo_names: dict[str, str] = {}
    for spec in specs:
        name, raw_path = split_spec(spec)
        if not name or not raw_path:
            problems.append(f"--adapter {spec!r}: expected NAME=PATH")
            continue
        names[name] = names.get(name, 0) + 1
        if names[name] == 2:
            problems.append(f"adapter name {name!r} is given more than once")
        repo_name = repo_template.format(name=name) if template_ok else name
        if template_ok:
            if "/" in repo_name:
                problems.append(
                    f"{name}: repo name {repo_name!r} contains '/'; give the owner with --namespace instead"
                )
            else:
                problems += [
                    f"{name}: repo name {repo_name!r} {why}" for why in repo_name_problems(repo_name)
                ]
            other = repo_names.setdefault(repo_name, name)
            if other != name:
                problems.append(f"{name}: repo name {repo_name!r} is also the repo of adapter {other!r}")
        upload = _check_adapter_dir(name, Path(raw_path).expanduser(), repo_name, evaluation, problems)
        if upload is not None:
            uploads.append(upload)
    return uploads


def repo_name_problems(name: str) -> list[str]:
    """Why ``name`` cannot be a Hub repo (or namespace) name, by huggingface_hub's ``validate_repo_id``;
    [] if valid. A name has no owner part: that comes from --namespace."""
    if "/" in name:
        return ["contains '/'"]
    try:
        validate_repo_id(name)
    except HFValidationError as err:
        return [f"is not a valid Hub name ({err})"]
    return []


def resolve_token(token_env: str, problems: list[str]) -> str | None:
    """The token from ``$token_env``, else the cached login; a missing token becomes a problem line."""
    token = os.environ.get(token_env) or None
    if token is None:
        try:
            token = get_token()
        except Exception as err:  # e.g. a failed OIDC exchange; its message is not about our token
            problems.append(f"could not read the cached Hugging Face login ({type(err).__name__})")
            return None
    if token is None:
        problems.append(
            f"no Hugging Face token: set the {token_env} environment variable or run `hf auth login` "
            "(a dry run needs no token)"
        )
    return token


def token_leaks(uploads: list[AdapterUpload], token: str, namespace: str) -> list[str]:
    """Files (or cards) that would publish the token itself, e.g. a config.yaml that recorded it."""
    needle = token.encode("utf-8")
    problems = []
    for upload in uploads:
        for f in upload.commit_files(upload.repo_id(namespace)):
            if f.content is not None:
                data = f.content
            elif f.source is not None and f.size <= MAX_SCANNED_BYTES:
                data = f.source.read_bytes()
            else:
                continue
            if needle in data:
                problems.append(f"{upload.name}: {f.path_in_repo} contains your Hub token; remove it first")
    return problems


def print_plan(uploads: list[AdapterUpload], namespace: str | None, private: bool) -> dict[str, str]:
    """Dry run: print each repo id and every file with its size; no network call."""
    owner = namespace or NAMESPACE_PLACEHOLDER
    visibility = "private" if private else "public"
    print(f"Dry run: nothing is uploaded and no network call is made. New repos would be {visibility}.")
    if namespace is None:
        print(f"  (no --namespace: {NAMESPACE_PLACEHOLDER} stands for the user of your token)")
    total_files = total_bytes = 0
    repo_ids = {}
    for upload in uploads:
        repo_id = upload.repo_id(owner)
        repo_ids[upload.name] = repo_id
        files = upload.commit_files(repo_id)
        size = sum(f.size for f in files)
        total_files, total_bytes = total_files + len(files), total_bytes + size
        print(f"\n{upload.name}: {upload.path} -> {repo_id}")
        width = max(len(f.path_in_repo) for f in files)
        for f in files:
            note = f"  [{f.note}]" if f.note else ""
            human = f"  ({format_size(f.size)})" if f.size >= 1024 else ""
            print(f"  {f.path_in_repo:<{width}}  {f.size:>13,} B{human}{note}")
        for path, reason in upload.skipped:
            print(f"  skipped {path}: {reason}")
        print(f"  total: {_count(len(files), 'file')}, {format_size(size)}")
    adapters = _count(len(uploads), "adapter")
    print(f"\nDry run: {adapters}, {_count(total_files, 'file')}, {format_size(total_bytes)} to upload.")
    return repo_ids


def push_adapters(
    uploads: list[AdapterUpload],
    *,
    api: HfApi,
    namespace: str | None = None,
    private: bool = False,
    commit_message: str = DEFAULT_COMMIT_MESSAGE,
) -> dict[str, str]:
    """Create (or reuse) each repo and upload its files and card in one commit; return name -> repo id."""
    secrets = [t for t in (getattr(api, "token", None),) if isinstance(t, str) and t]
    if namespace is None:
        try:
            namespace = api.whoami()["name"]
        except Exception as err:
            raise HubPushError(
                "could not find your Hub username (whoami failed: "
                f"{_redact(_describe(err), secrets)}); pass --namespace"
            ) from None
    pushed: dict[str, str] = {}
    urls: dict[str, str] = {}
    for upload in uploads:
        repo_id = upload.repo_id(namespace)
        files = upload.commit_files(repo_id)
        try:
            url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            operations = [
                CommitOperationAdd(path_in_repo=f.path_in_repo, path_or_fileobj=_payload(f)) for f in files
            ]
            api.create_commit(repo_id, operations, commit_message=commit_message, repo_type="model")
        except Exception as err:
            done = ", ".join(pushed.values()) or "none"
            raise HubPushError(
                f"{upload.name}: upload to {repo_id} failed: {_redact(_describe(err), secrets)} "
                f"(already pushed: {done}; re-running updates the same repos)"
            ) from None
        pushed[upload.name] = repo_id
        urls[upload.name] = str(getattr(url, "url", url))
        size = format_size(sum(f.size for f in files))
        print(f"{upload.name}: pushed {len(files)} files ({size}) to {urls[upload.name]}")
    print(f"Pushed {_count(len(pushed), 'adapter')}:")
    width = max((len(name) for name in urls), default=0)
    for name, url in urls.items():
        print(f"  {name:<{width}}  {url}")
    return pushed


def format_size(n: int) -> str:
    """Bytes in binary units: ``1536 -> '1.5 KiB'``."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _check_adapter_dir(
    name: str, path: Path, repo_name: str, evaluation: dict[str, Any] | None, problems: list[str]
) -> AdapterUpload | None:
    if not path.exists():
        problems.append(f"{name}: {path} does not exist")
        return None
    if not path.is_dir():
        problems.append(f"{name}: {path} is not a directory")
        return None
    before = len(problems)
    if not any((path / weights).is_file() for weights in ADAPTER_WEIGHTS):
        problems.append(f"{name}: {path} has no {' or '.join(ADAPTER_WEIGHTS)}")
    if not (path / ADAPTER_CONFIG).is_file():
        problems.append(f"{name}: {path} has no {ADAPTER_CONFIG}")
    files, skipped = _collect_files(path)
    card_inputs = None
    readme = path / CARD_NAME
    own_readme = readme.is_file() and not is_placeholder_card(readme.read_text("utf-8", errors="replace"))
    if not own_readme:
        if readme.is_file():
            files = [f for f in files if f.path_in_repo != CARD_NAME]
            skipped.insert(0, (CARD_NAME, "PEFT's placeholder card; replaced by the generated card"))
        if len(problems) == before:  # the card needs adapter_config.json; don't report it twice
            card_inputs, card_problems = read_card_inputs(name, path, evaluation)
            problems += [f"{name}: {p}" for p in card_problems]
    if len(problems) != before:
        return None
    return AdapterUpload(name, path, repo_name, files, skipped, card_inputs)


def _collect_files(root: Path) -> tuple[list[UploadFile], list[tuple[str, str]]]:
    """Every file under ``root`` that ``SKIPPED``'s patterns let through (huggingface_hub's own filter),
    sorted, and ``(path, reason)`` for the rest: a hidden or cache folder once, as ``folder/``."""
    paths = sorted((Path(d) / f).relative_to(root).as_posix() for d, _, fs in os.walk(root, followlinks=True)
                   for f in fs)
    skipped: dict[str, str] = {}
    for reason, patterns in SKIPPED.items():
        for rel in filter_repo_objects(paths, allow_patterns=patterns):
            parts = rel.split("/")
            cut = next((i for i, p in enumerate(parts[:-1]) if p.startswith(".") or p == "__pycache__"), None)
            skipped.setdefault(rel if cut is None else "/".join(parts[: cut + 1]) + "/", reason)
    kept = filter_repo_objects(paths, ignore_patterns=[p for patterns in SKIPPED.values() for p in patterns])
    return [UploadFile(rel, (root / rel).stat().st_size, source=root / rel) for rel in kept], list(skipped.items())


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _payload(f: UploadFile) -> str | bytes:
    return f.content if f.content is not None else str(f.source)


def _describe(err: Exception) -> str:
    return f"{type(err).__name__}: {err}".strip().rstrip(":")


def _redact(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, "***")
    return text
