"""Publishing a complete result to the Hugging Face Hub: the adapter, the merged model or both, with the model card.

    python -m entrypoints.hub --output s3://bucket/outputs/run1 --repo org/name [--parts adapter] [--private true]
    # publish a complete output (again): what to do after the job's exit 9

The job publishes after its manifest is written (world rank 0 only: the other ranks never reach that step), from the
files it has just staged: the S3/local output is complete before the Hub is contacted, and nothing here writes to it.
A failure is logged, reported in the summary line (`hub.error`) and ends the job with exit 9; this module's command
then retries only the publish, from the output (every file checked against the manifest's sha256 first).

One publish is one commit (huggingface_hub's HfApi: create_repo with exist_ok, then create_commit). Layout in the
repository: the one part chosen at its root (so `from_pretrained("org/name")` loads it); with both, the merged model at
the root and the adapter in adapter/ (an adapter_config.json at the root would make transformers load the root as an
adapter). README.md is the job's model card, with Hub metadata: `base_model` only when the base is a Hub id (the Hub
rejects other values), `library_name` peft or transformers. When the base is a Hub id, the adapter_config.json sent
names it as `base_model_name_or_path` (the job's names the directory it loaded the base from, which exists only on
the training machine); every other file is sent as the manifest lists it.

Privacy: QLORA_HUB_PRIVATE=true (the default) creates the repository private and refuses to publish to an existing
repository that is public. The token (HF_TOKEN from the job's secret sources) is sent in the Authorization header
only; any message from the Hub is scrubbed of it before it is logged, printed or written to the failure file.

Tests: the Hub is not reachable from the test machines. tests/integration/test_hub.py runs huggingface_hub against a
local HTTP server (HF_ENDPOINT) that implements the endpoints a publish uses and records every request: what the job
sends (repository creation and its visibility, the files of the commit, the Authorization header) is asserted there,
not what the real Hub would answer.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from entrypoints.config import FIELDS, JobConfig, _convert, env_name, hub_repo_problem
from entrypoints.errors import ConfigError, HubPublishError, run_guarded

log = logging.getLogger("qlora.hub")

CARD = "README.md"
# Where a part's files go in the repository, by what is published.
LAYOUT = {"adapter": {"adapter": ""}, "merged": {"merged": ""}, "both": {"merged": "", "adapter": "adapter/"}}
WHAT = {"adapter": "adapter", "merged": "merged model", "both": "merged model and adapter"}
_FRONT_MATTER = re.compile(r"\A---\n.*?\n---\n", re.DOTALL)


@dataclass(frozen=True)
class HubTarget:
    repo: str
    private: bool
    parts: str  # adapter, merged or both

    @classmethod
    def of(cls, cfg: JobConfig) -> HubTarget | None:
        return cls(cfg.hub_repo, cfg.hub_private, cfg.hub_parts) if cfg.hub_repo else None


def check_token(hub_repo: str, secrets: Mapping[str, str]) -> None:
    """Before any download or training: a Hub target needs a token, or the job would train for hours and then
    fail to publish."""
    if hub_repo and not secrets.get("HF_TOKEN"):
        raise ConfigError([f"{env_name('hub_repo')}={hub_repo!r} needs a Hugging Face token with write access:"
                           " set HF_TOKEN (in the environment, a file in QLORA_SECRETS_DIR or a key of the"
                           f" QLORA_SECRETS_ARN secret), or unset {env_name('hub_repo')}"])


def repo_files(parts: str, listed: Sequence[str]) -> dict[str, str]:
    """path in the repository -> path in the output, for the files of the chosen parts (the card not included)."""
    files = {}
    for rel in listed:
        folder, _, name = rel.partition("/")
        prefix = LAYOUT[parts].get(folder)
        if prefix is not None and name:
            files[prefix + name] = rel
    return files


def hub_card(card: str, base_model: str, parts: str, repo: str) -> str:
    """The job's model card with metadata the Hub accepts, and how to load this repository."""
    from entrypoints.modeling import HUB_ID

    meta = ([f"base_model: {base_model}"] if HUB_ID.match(base_model) else []) + [
        f"library_name: {'peft' if parts == 'adapter' else 'transformers'}", "tags: [qlora, lora, sft, trl]"]
    body = _FRONT_MATTER.sub("", card, count=1)
    if parts == "adapter":
        how = (f"This repository holds the LoRA adapter at its root: `PeftModel.from_pretrained(base, \"{repo}\")`"
               f" on the base model `{base_model}`.")
    else:
        how = (f"This repository holds the merged model at its root: `AutoModelForCausalLM.from_pretrained(\"{repo}\")`"
               " (an encoder-decoder loads with `AutoModelForSeq2SeqLM`).")
        if parts == "both":
            how += f" The adapter is in `adapter/`: `PeftModel.from_pretrained(base, \"{repo}\", subfolder=\"adapter\")`."
    return "---\n" + "\n".join(meta) + "\n---\n" + body.rstrip("\n") + "\n\n## On the Hub\n" + how + "\n"


def _adapter_config(path: Path, base_model: str) -> bytes:
    from entrypoints.modeling import HUB_ID

    data = path.read_bytes()
    if not HUB_ID.match(base_model):
        return data
    config = json.loads(data)
    config["base_model_name_or_path"] = base_model
    return (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()


def publish(target: HubTarget, root: Path, listed: Sequence[str], token: str, *, base_model: str, source: str,
            run: str) -> dict[str, Any]:
    """Create the repository if needed and commit the chosen parts and the card from `root` (a complete output's
    files); -> what was published. Raises HubPublishError with the Hub's answer, scrubbed of the token. `source` (the
    output's URI) goes into messages here, never to the Hub; the commit names the run (`run`) only."""
    from huggingface_hub import CommitOperationAdd, HfApi

    files = repo_files(target.parts, listed)
    if not files:
        raise HubPublishError(f"{source} has no {target.parts} files to publish (it holds"
                              f" {', '.join(sorted({p.split('/')[0] for p in listed}))})")
    if CARD not in listed:
        raise HubPublishError(f"{source} has no model card ({CARD}) to publish")
    operations = [CommitOperationAdd(path_in_repo=CARD, path_or_fileobj=hub_card(
        (root / CARD).read_text(encoding="utf-8"), base_model, target.parts, target.repo).encode())]
    for in_repo, rel in sorted(files.items()):
        content = (_adapter_config(root / rel, base_model) if rel == "adapter/adapter_config.json"
                   else str(root / rel))
        operations.append(CommitOperationAdd(path_in_repo=in_repo, path_or_fileobj=content))
    api = HfApi(token=token)
    try:
        url = api.create_repo(target.repo, private=target.private, exist_ok=True, repo_type="model")
        info = api.repo_info(target.repo, repo_type="model")
        if target.private and not info.private:
            raise HubPublishError(f"{target.repo} exists on the Hub and is public, while {env_name('hub_private')}"
                                  " is true: nothing was uploaded. Make the repository private, choose another"
                                  f" {env_name('hub_repo')}, or set {env_name('hub_private')}=false to publish there")
        log.info("publishing %d file(s) of %s (%s) to the Hub repository %s (%s)", len(operations), source,
                 target.parts, target.repo, "private" if info.private else "public")
        commit = api.create_commit(target.repo, operations, repo_type="model",
                                   commit_message=f"Publish the {WHAT[target.parts]} of run {run or '?'}"[:200],
                                   commit_description="The files as the run's manifest.json lists them (sha256), with"
                                   " its model card.")
    except HubPublishError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure of the Hub or the network is the same outcome: exit 9
        # The advice first: the failure file keeps only the first 1024 characters, and a server's answer can be long.
        raise HubPublishError(f"could not publish {source} to the Hub repository {target.repo} (the output is complete"
                              " and unchanged; retry only the publish with `python -m entrypoints.hub --output"
                              f" {source} --repo {target.repo} --parts {target.parts}`): "
                              + scrub(_describe(exc), token)) from None
    published = {"repo": target.repo, "url": str(url), "private": bool(info.private), "parts": target.parts,
                 "commit": commit.oid, "files": [op.path_in_repo for op in operations]}
    log.info("published to the Hub: %s, commit %s", published["url"], commit.oid)
    return published


def _describe(exc: BaseException) -> str:
    """One line: the HTTP status and URL with the server's own message (huggingface_hub's text adds a reference link
    and blank lines), or the exception."""
    response = getattr(exc, "response", None)
    status, url = getattr(response, "status_code", None), getattr(getattr(response, "request", None), "url", None)
    if status is not None:
        detail = getattr(exc, "server_message", None) or str(exc).splitlines()[0]
        text = f"HTTP {status} from {url}: {detail}"
    else:
        text = f"{type(exc).__name__}: {exc}"
    return " ".join(text.split())[:600]


def scrub(text: str, token: str) -> str:
    """The text without the token (an error may quote a request's headers)."""
    return text.replace(token, "[REDACTED]") if token else text


def publish_result(target: HubTarget | None, stage: Path, token: str | None, source: str) -> dict[str, Any] | None:
    """The job's step after its manifest: publish from the staged output; never raises. -> the summary's `hub` entry
    (with `error` when it failed), None when no Hub repository is set."""
    if target is None:
        return None
    try:
        manifest = json.loads((stage / "manifest.json").read_text(encoding="utf-8"))
        listed = [f["path"] for f in manifest["files"]]
        base_model = str((manifest.get("base_model") or {}).get("source") or "")
        return {"published": True, **publish(target, stage, listed, token or "", base_model=base_model, source=source,
                                             run=str((manifest.get("run") or {}).get("id") or ""))}
    except Exception as exc:  # noqa: BLE001 - reported in the summary; the job then exits 9 (raise_if_failed)
        message = str(exc) if isinstance(exc, HubPublishError) else scrub(f"{type(exc).__name__}: {exc}", token or "")
        log.error("Hub publish failed: %s", message)
        return {"published": False, "repo": target.repo, "parts": target.parts, "error": message}


def raise_if_failed(hub: Mapping[str, Any] | None) -> None:
    """After the summary is printed: a failed publish ends the job with exit 9."""
    if hub and not hub.get("published"):
        raise HubPublishError(str(hub.get("error") or "the publish to the Hub failed"))


# ------------------------------------------------------------------------------------------- retry the publish
def main(argv: Sequence[str] | None = None) -> int:
    env = os.environ
    ap = argparse.ArgumentParser(prog="python -m entrypoints.hub", description=(
        "Publish a complete output of the job to the Hugging Face Hub (after the job's exit 9, or later). Every file"
        " is checked against the output's manifest first. Settings default to the job's QLORA_HUB_* variables; the"
        " token is HF_TOKEN (or a file in QLORA_SECRETS_DIR, or the QLORA_SECRETS_ARN secret)."))
    ap.add_argument("--output", required=True, help="the job's output: an s3:// prefix or a directory with manifest.json"
                    " (or a version series' root, or a runs/<id>/ prefix)")
    ap.add_argument("--repo", default=env.get("QLORA_HUB_REPO", ""), help="org/name (default: QLORA_HUB_REPO)")
    ap.add_argument("--parts", default=env.get("QLORA_HUB_PARTS", FIELDS["hub_parts"].default),
                    help=f"{', '.join(FIELDS['hub_parts'].metadata['choices'])} (default: QLORA_HUB_PARTS, else"
                    f" {FIELDS['hub_parts'].default})")
    ap.add_argument("--private", default=env.get("QLORA_HUB_PRIVATE", "true"),
                    help="create the repository private; a public existing one is refused (default: QLORA_HUB_PRIVATE,"
                    " else true)")
    ap.add_argument("--s3-endpoint-url", default=env.get("QLORA_S3_ENDPOINT_URL", ""),
                    help="endpoint of an S3-compatible store (default: QLORA_S3_ENDPOINT_URL, else AWS)")
    ap.add_argument("--cache-dir", type=Path, default=None, help="where an S3 output's files are downloaded to"
                    " (default: $XDG_CACHE_HOME/qlora-job or ~/.cache/qlora-job)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        force=True)

    def run() -> None:
        from entrypoints.chat.source import default_cache_dir, fetch_files, find_result
        from entrypoints.secrets import install_redactor, resolve_secrets

        problems = []
        for name, value in (("hub_parts", args.parts), ("hub_private", args.private)):
            try:
                _convert(FIELDS[name], value)
            except ValueError as exc:
                problems.append(f"--{name.removeprefix('hub_')}={value!r}: {exc}")
        if not args.repo:
            problems.append("--repo is not set (nor QLORA_HUB_REPO): give the Hub repository as org/name")
        elif hub_repo_problem(args.repo):
            problems.append(f"--repo={args.repo!r}: {hub_repo_problem(args.repo)}")
        if problems:
            raise ConfigError(problems)
        target = HubTarget(args.repo, _convert(FIELDS["hub_private"], args.private), args.parts)
        cfg = JobConfig(secrets_dir=env.get("QLORA_SECRETS_DIR", ""), secrets_arn=env.get("QLORA_SECRETS_ARN", ""))
        secrets = resolve_secrets(cfg, env)
        install_redactor()
        check_token(target.repo, secrets)
        result = find_result(args.output, args.s3_endpoint_url)
        if result is None:
            raise ConfigError([f"--output {args.output} holds no manifest.json: only a complete output of the job is"
                               " published"])
        chosen = repo_files(target.parts, list(result.files))
        if not chosen:
            raise HubPublishError(f"{result.uri} has no {target.parts} files to publish (its manifest lists"
                                  f" {', '.join(result.parts) or 'no model'})")
        wanted = {rel: result.files[rel] for rel in [*chosen.values(), CARD] if rel in result.files}
        root = fetch_files(result, wanted, args.cache_dir or default_cache_dir(), args.s3_endpoint_url)
        base_model = str((result.manifest.get("base_model") or {}).get("source") or "")
        published = publish(target, root, list(wanted), secrets["HF_TOKEN"], base_model=base_model, source=result.uri,
                            run=str((result.manifest.get("run") or {}).get("id") or ""))
        print(json.dumps(published), flush=True)

    return run_guarded(run, lambda: None)


if __name__ == "__main__":
    sys.exit(main())
