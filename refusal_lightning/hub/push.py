"""Push adapter dirs to the Hugging Face Hub, one model repo per adapter, each with a model card.

:func:`plan_uploads` checks everything with no network call and all problems are raised together; a dry run prints
the plan; otherwise :func:`push_adapters` uploads each dir's files plus the card (rendered in memory: the dir is not
modified) in one commit, so a repo never holds new weights with an old card. The token is handed to
:class:`huggingface_hub.HfApi` and nothing else: it is not printed, logged, written, or kept in error messages.
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
from refusal_lightning.hub import model_card
from refusal_lightning.specs import split_spec

ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
CARD_NAME = "README.md"
DEFAULT_COMMIT_MESSAGE = "Upload adapter with refusal_lightning push"
# Shown in a dry run without --namespace: resolving the real one needs whoami(), a network call.
NAMESPACE_PLACEHOLDER = "<your-hf-username>"
# Not uploaded (huggingface_hub ignore patterns: fnmatch, `*` spans folders), by the reason a dry run shows.
# Lightning checkpoints hold the optimizer state and often the base weights: not an adapter.
SKIPPED = {"hidden file or folder": [".*", "*/.*"], "cache folder": ["__pycache__/*", "*/__pycache__/*"],
           "Lightning checkpoint, not part of the adapter": ["*.ckpt"]}
# Files up to this size are searched for the token before upload; weights are larger and never hold it.
MAX_SCANNED_BYTES = 16 * 2**20


class PushValidationError(ValueError):
    """Everything wrong with a push request, found before the first upload; one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        lines = "".join(f"\n  - {p}" for p in problems)
        super().__init__(f"cannot push ({_count(len(problems), 'problem')}):{lines}")


class HubPushError(RuntimeError):
    """An upload failed; says which adapters were pushed before it, with any credential redacted."""


@dataclass
class AdapterUpload:
    """A checked adapter dir and where it goes; the card is rendered once the namespace is known."""

    name: str
    path: Path
    repo_name: str
    files: list[str]  # taken from the dir as they are, relative to it (as in the repo)
    skipped: list[tuple[str, str]]  # (path, reason) for what is in the dir but not uploaded
    card_inputs: model_card.CardInputs | None  # None when the dir has its own README.md, uploaded unchanged

    def repo_id(self, namespace: str) -> str:
        return f"{namespace}/{self.repo_name}"

    def commit_files(self, namespace: str) -> dict[str, Path | bytes]:
        """Exactly what one commit sends, path in repo -> file: the dir's files, plus the generated card."""
        files: dict[str, Path | bytes] = {rel: self.path / rel for rel in self.files}
        if self.card_inputs is not None:
            files[CARD_NAME] = model_card.render_model_card(self.card_inputs, self.repo_id(namespace)).encode("utf-8")
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
    return push_adapters(uploads, api=api, namespace=namespace, private=private, commit_message=commit_message)


def plan_uploads(specs: list[str], repo_template: str, eval_summary: str | None,
                 problems: list[str]) -> list[AdapterUpload]:
    """Check NAME=PATH specs and their dirs without touching the network; append every problem found."""
    if not specs:
        problems.append("no adapters given: pass --adapter NAME=PATH (repeatable)")
    evaluation = None
    if eval_summary is not None:
        try:
            evaluation = model_card.load_eval_summary(Path(eval_summary).expanduser())
        except ValueError as err:
            problems.append(str(err))
    template: str | None = repo_template
    try:
        repo_template.format(name="x")
    except (KeyError, IndexError, ValueError) as err:
        problems.append(f"--repo_template {repo_template!r}: only {{name}} may be used ({err!r})")
        template = None  # its repo names are not checked: each would repeat the problem above
    uploads: list[AdapterUpload] = []
    names: list[str] = []
    repo_names: dict[str, str] = {}
    for spec in specs:
        name, raw_path = split_spec(spec)
        if not name or not raw_path:
            problems.append(f"--adapter {spec!r}: expected NAME=PATH")
            continue
        if names.count(name) == 1:
            problems.append(f"adapter name {name!r} is given more than once")
        names.append(name)
        repo_name = name if template is None else template.format(name=name)
        if template is not None:
            hint = "; give the owner with --namespace instead" if "/" in repo_name else ""
            problems += [f"{name}: repo name {repo_name!r} {why}{hint}" for why in repo_name_problems(repo_name)]
            if (other := repo_names.setdefault(repo_name, name)) != name:
                problems.append(f"{name}: repo name {repo_name!r} is also the repo of adapter {other!r}")
        upload = _check_adapter_dir(name, Path(raw_path).expanduser(), repo_name, evaluation, problems)
        uploads += [upload] if upload is not None else []
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
    try:
        token = os.environ.get(token_env) or get_token()
    except Exception as err:  # e.g. a failed OIDC exchange; its message is not about our token
        problems.append(f"could not read the cached Hugging Face login ({type(err).__name__})")
        return None
    if token is None:
        problems.append(f"no Hugging Face token: set the {token_env} environment variable or run `hf auth login` "
                        "(a dry run needs no token)")
    return token


def token_leaks(uploads: list[AdapterUpload], token: str, namespace: str) -> list[str]:
    """Files (or cards) that would publish the token itself, e.g. a config.yaml that recorded it."""
    def scanned(data: Path | bytes) -> bytes:
        return data if isinstance(data, bytes) else data.read_bytes() if _size(data) <= MAX_SCANNED_BYTES else b""

    return [f"{upload.name}: {rel} contains your Hub token; remove it first" for upload in uploads
            for rel, data in upload.commit_files(namespace).items() if token.encode("utf-8") in scanned(data)]


def print_plan(uploads: list[AdapterUpload], namespace: str | None, private: bool) -> dict[str, str]:
    """Dry run: print each repo id and every file with its size; no network call."""
    visibility = "private" if private else "public"
    print(f"Dry run: nothing is uploaded and no network call is made. New repos would be {visibility}.")
    if namespace is None:
        print(f"  (no --namespace: {NAMESPACE_PLACEHOLDER} stands for the user of your token)")
    owner, total_files, total_bytes = namespace or NAMESPACE_PLACEHOLDER, 0, 0
    for upload in uploads:
        files = upload.commit_files(owner)
        sizes = {rel: _size(data) for rel, data in files.items()}
        total_files, total_bytes = total_files + len(files), total_bytes + sum(sizes.values())
        print(f"\n{upload.name}: {upload.path} -> {upload.repo_id(owner)}")
        width = max(map(len, files))
        for rel, size in sizes.items():
            note = "  [generated model card]" if isinstance(files[rel], bytes) else ""
            human = f"  ({format_size(size)})" if size >= 1024 else ""
            print(f"  {rel:<{width}}  {size:>13,} B{human}{note}")
        for path, reason in upload.skipped:
            print(f"  skipped {path}: {reason}")
        print(f"  total: {_count(len(files), 'file')}, {format_size(sum(sizes.values()))}")
    adapters = _count(len(uploads), "adapter")
    print(f"\nDry run: {adapters}, {_count(total_files, 'file')}, {format_size(total_bytes)} to upload.")
    return {upload.name: upload.repo_id(owner) for upload in uploads}


def push_adapters(uploads: list[AdapterUpload], *, api: HfApi, namespace: str | None = None, private: bool = False,
                  commit_message: str = DEFAULT_COMMIT_MESSAGE) -> dict[str, str]:
    """Create (or reuse) each repo and upload its files and card in one commit; return name -> repo id."""
    if namespace is None:
        try:
            namespace = api.whoami()["name"]
        except Exception as err:
            raise HubPushError(f"could not find your Hub username (whoami failed: {_redacted(err, api.token)}); "
                               "pass --namespace") from None
    pushed: dict[str, str] = {}
    urls: dict[str, str] = {}
    for upload in uploads:
        repo_id, files = upload.repo_id(namespace), upload.commit_files(namespace)
        try:
            url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            operations = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=data) for rel, data in files.items()]
            api.create_commit(repo_id, operations, commit_message=commit_message, repo_type="model")
        except Exception as err:
            done = ", ".join(pushed.values()) or "none"
            raise HubPushError(f"{upload.name}: upload to {repo_id} failed: {_redacted(err, api.token)} "
                               f"(already pushed: {done}; re-running updates the same repos)") from None
        pushed[upload.name], urls[upload.name] = repo_id, str(url)
        size = format_size(sum(map(_size, files.values())))
        print(f"{upload.name}: pushed {len(files)} files ({size}) to {url}")
    print(f"Pushed {_count(len(pushed), 'adapter')}:")
    width = max(map(len, urls), default=0)
    for name, url in urls.items():
        print(f"  {name:<{width}}  {url}")
    return pushed


def format_size(n: int) -> str:
    """Bytes in binary units: ``1536 -> '1.5 KiB'``."""
    size, units = float(n), ["B", "KiB", "MiB", "GiB"]
    while size >= 1024 and len(units) > 1:
        size, units = size / 1024, units[1:]
    return f"{n} B" if units[0] == "B" else f"{size:.1f} {units[0]}"


def _check_adapter_dir(name: str, path: Path, repo_name: str, evaluation: dict[str, Any] | None,
                       problems: list[str]) -> AdapterUpload | None:
    if not path.is_dir():
        problems.append(f"{name}: {path} {'is not a directory' if path.exists() else 'does not exist'}")
        return None
    before = len(problems)
    if not any((path / weights).is_file() for weights in ADAPTER_WEIGHTS):
        problems.append(f"{name}: {path} has no {' or '.join(ADAPTER_WEIGHTS)}")
    if not (path / model_card.ADAPTER_CONFIG).is_file():
        problems.append(f"{name}: {path} has no {model_card.ADAPTER_CONFIG}")
    files, skipped = _collect_files(path)
    readme = path / CARD_NAME
    card_inputs = None
    if readme.is_file() and model_card.is_placeholder_card(readme.read_text("utf-8", errors="replace")):
        files.remove(CARD_NAME)
        skipped.insert(0, (CARD_NAME, "PEFT's placeholder card; replaced by the generated card"))
    if CARD_NAME not in files and len(problems) == before:  # the card needs adapter_config.json: not twice
        card_inputs, card_problems = model_card.read_card_inputs(name, path, evaluation)
        problems += [f"{name}: {p}" for p in card_problems]
    if len(problems) != before:
        return None
    return AdapterUpload(name, path, repo_name, files, skipped, card_inputs)


def _collect_files(root: Path) -> tuple[list[str], list[tuple[str, str]]]:
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
    ignored = [pattern for patterns in SKIPPED.values() for pattern in patterns]
    return list(filter_repo_objects(paths, ignore_patterns=ignored)), list(skipped.items())


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _size(data: Path | bytes) -> int:
    return len(data) if isinstance(data, bytes) else data.stat().st_size


def _redacted(err: Exception, token: Any) -> str:
    text = f"{type(err).__name__}: {err}".strip().rstrip(":")
    return text.replace(token, "***") if isinstance(token, str) and token else text
