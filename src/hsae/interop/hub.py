"""Sharing on the Hugging Face Hub: ``hsae upload RUN REPO_ID``.

The repository is exactly the SAELens export of :func:`hsae.interop.saelens.export_saelens`
(``README.md``, ``hsae/level_{l}/{cfg.json, sae_weights.safetensors, sparsity.safetensors}``,
``hsae/forest.json``, the same for ``baseline``), staged in a temporary folder and pushed in one
commit with ``huggingface_hub``. ``SAE.from_pretrained(REPO_ID, "hsae/level_0")`` loads a level;
``hsae import-saelens`` on the downloaded level folders rebuilds the forest from the parent
links each level's ``cfg.json`` carries.

Every check that needs no network comes first (the run, the repository id), then whether the
Hub can be reached at all (``HF_HUB_OFFLINE``, a connection to the endpoint) and whether a token
is set, all before the export is built: an offline machine gets one line saying what to do.
"""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from hsae.interop.saelens import InteropError, export_saelens, model_sources

CONNECT_TIMEOUT_S = 5.0


def upload(
    run_dir: str | Path,
    repo_id: str,
    private: bool = False,
    revision: str = "main",
    model_name: str | None = None,
    layer: int | None = None,
) -> str:
    """Export ``run_dir`` (a run folder, an extracted archive or a saved model folder) for
    SAELens and push it to the Hub model repository ``repo_id`` (created if missing, private
    if ``private``) on branch ``revision``; return the commit URL."""
    model_sources(Path(run_dir))  # a missing or empty folder fails before any network use
    check_repo_id(repo_id)
    check_hub_reachable()
    api = _api()
    with tempfile.TemporaryDirectory(prefix="hsae-upload-") as tmp:
        staged = Path(tmp) / "export"
        export_saelens(run_dir, staged, model_name, layer=layer, repo_id=repo_id)
        return push_folder(api, staged, repo_id, private, revision)


def check_repo_id(repo_id: str) -> None:
    """Refuse a repository id the Hub would refuse ("owner/name")."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise InteropError(f"REPO_ID {repo_id!r} is not a Hub repository id: {error}") from None
    if repo_id.count("/") != 1:
        raise InteropError(
            f"REPO_ID must be 'owner/name' (your user or organisation), got {repo_id!r}"
        )


def check_hub_reachable(timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Raise :class:`InteropError` (one line, saying what to do) unless the Hub endpoint can be
    reached and a token is set."""
    from huggingface_hub import constants, get_token

    offline_advice = (
        "export with `hsae export RUN --format saelens OUT`, copy OUT to a machine online and "
        "run `hf upload REPO_ID OUT .` there (or `hsae upload` with the run)"
    )
    if constants.HF_HUB_OFFLINE:
        raise InteropError(
            f"hsae upload needs the Hugging Face Hub but HF_HUB_OFFLINE is set; unset it, or "
            f"{offline_advice}"
        )
    endpoint = urlparse(constants.ENDPOINT)
    host = endpoint.hostname or ""
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    if not _proxied():  # behind a proxy a direct connection proves nothing: the upload tells
        try:
            socket.create_connection((host, port), timeout=timeout).close()
        except OSError as error:
            reason = error.strerror or type(error).__name__
            raise InteropError(
                f"hsae upload cannot reach the Hugging Face Hub at {constants.ENDPOINT} "
                f"({reason}); this machine looks offline: {offline_advice}"
            ) from None
    try:
        token = get_token()
    except Exception as error:  # e.g. a failed OIDC token exchange (HF_OIDC_RESOURCE set)
        raise InteropError(f"cannot get a Hugging Face token: {error}") from None
    if token is None:
        raise InteropError(
            "no Hugging Face token: run `hf auth login` or set HF_TOKEN to a token with write "
            "access, then run hsae upload again"
        )


def _proxied() -> bool:
    return any(
        os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
    )


def _api() -> Any:
    """A ``huggingface_hub.HfApi`` (imported only when uploading)."""
    from huggingface_hub import HfApi

    return HfApi()


def push_folder(api: Any, folder: Path, repo_id: str, private: bool, revision: str) -> str:
    """Create the repository (and branch) if needed and upload ``folder`` in one commit."""
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        if revision != "main":
            api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
        commit = api.upload_folder(
            folder_path=str(folder),
            repo_id=repo_id,
            repo_type="model",
            revision=revision,
            commit_message="Upload hsae export (SAELens layout)",
        )
    except Exception as error:  # HTTP, connection, auth errors of whichever client is in use
        message = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        raise InteropError(
            f"upload to {repo_id} failed ({type(error).__name__}): {message}"
        ) from None
    return str(getattr(commit, "commit_url", commit))
