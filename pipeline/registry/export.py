"""Export a pretrained backbone in timm's hub folder format, load it back, and resolve references.

An export folder holds exactly what timm's own ``push_to_hf_hub`` writes:

- ``config.json``: ``architecture``, ``num_classes`` (0: the backbone has no classifier),
  ``num_features``, ``global_pool``, ``model_args`` (the keyword arguments that rebuild the
  architecture), ``pretrained_cfg`` (input size, mean/std, interpolation, crop_pct: the
  preprocessing a downstream user needs) and, for provenance only, ``ssl_foundry`` (method, steps,
  MLflow run id...).
- ``model.safetensors``: the backbone's ``state_dict``.

So a consumer needs only timm, torch and safetensors. Two equivalent ways to load a folder:

- ``load_timm_backbone(folder)`` below (explicit ``create_model`` call with the saved model_args);
- ``timm.create_model(f"local-dir:{folder}", pretrained=True)`` (timm >= 1.0 reads config.json
  itself, including ``model_args`` and ``num_classes=0``; verified with timm 1.0.31).

What MLflow stores of a run's backbone is an MLflow model (``save_mlflow_model``) with these two
files at its root, so the same folder also loads with ``mlflow.pytorch``, ``mlflow.pyfunc`` and
``mlflow models serve``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow.artifacts
import mlflow.pytorch
import numpy as np
import timm
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.models import Model, infer_signature
from safetensors.torch import save_file

from ssl_foundry.pipeline.registry.tracking_server import check_store_exists

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
# Preprocessing fields copied from the architecture's own timm pretrained_cfg into the export.
_INHERITED_PRETRAINED_FIELDS = ("interpolation", "crop_pct", "crop_mode", "first_conv", "classifier",
                                "fixed_input_size")
_DEFAULT_PREPROCESSING = {"interpolation": "bicubic", "crop_pct": 0.875, "crop_mode": "center"}


def _global_pool_name(backbone: torch.nn.Module) -> str | None:
    """timm stores the pool either as a string (ViTs) or as a SelectAdaptivePool2d (CNNs)."""
    pool = getattr(backbone, "global_pool", None)
    if isinstance(pool, str):
        return pool
    return getattr(pool, "pool_type", None)


def _export_config(backbone: torch.nn.Module, arch: str, model_args: dict, input_size: tuple[int, int, int],
                   mean: tuple, std: tuple, extra: dict | None, num_classes: int) -> dict[str, Any]:
    arch_cfg = getattr(backbone, "pretrained_cfg", None) or {}
    pretrained_cfg = {**_DEFAULT_PREPROCESSING,
                      **{k: arch_cfg[k] for k in _INHERITED_PRETRAINED_FIELDS if arch_cfg.get(k) is not None}}
    pretrained_cfg.update(input_size=list(input_size), mean=list(mean), std=list(std), num_classes=num_classes)
    config = {
        "architecture": arch,
        "num_classes": num_classes,
        "num_features": int(backbone.num_features),
        "global_pool": _global_pool_name(backbone),
        "model_args": dict(model_args),
        "pretrained_cfg": pretrained_cfg,
        "ssl_foundry": dict(extra or {}),
    }
    return {key: value for key, value in config.items() if value is not None}


def export_timm_backbone(backbone: torch.nn.Module, arch: str, model_args: dict, out_dir: str | Path,
                         input_size: tuple[int, int, int], mean: tuple, std: tuple,
                         extra: dict | None = None, num_classes: int = 0) -> Path:
    """Write ``backbone`` (a timm model created with ``num_classes=0``) as a timm hub folder.

    ``num_classes`` > 0 exports a classifier instead (a fine-tuned model: the backbone with its
    classifier of that many classes), which ``timm.create_model("local-dir:...", pretrained=True)``
    loads with its head.

    ``model_args`` must be exactly the keyword arguments the backbone was created with (besides
    ``num_classes``), since plain timm rebuilds the architecture from them. The folder is written
    to a temporary sibling and renamed into place, so a reader never sees a half-written export
    (an existing export is replaced as a whole). Returns ``out_dir``.
    """
    if getattr(backbone, "num_classes", 0) != num_classes:
        raise ValueError(f"export_timm_backbone: {arch} has num_classes={backbone.num_classes}, not {num_classes}; "
                         f"export the backbone created with num_classes=0 (features only), or pass the "
                         f"classifier's num_classes.")
    if "num_classes" in model_args:
        raise ValueError("export_timm_backbone: model_args must not contain num_classes (an argument of its own).")
    in_chans = model_args.get("in_chans", 3)
    if input_size[0] != in_chans:
        raise ValueError(f"export_timm_backbone: input_size {tuple(input_size)} has {input_size[0]} channels "
                         f"but the backbone takes in_chans={in_chans}.")
    config = _export_config(backbone, arch, model_args, input_size, mean, std, extra, num_classes)
    # safetensors needs contiguous, CPU, non-shared tensors (channels_last weights are not contiguous).
    tensors = {name: t.detach().cpu().contiguous() for name, t in backbone.state_dict().items()}

    out_dir = Path(out_dir).absolute()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        save_file(tensors, str(staging / WEIGHTS_FILE), metadata={"format": "pt"})
        (staging / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        os.chmod(staging, 0o755)  # mkdtemp creates 0700; an export is meant to be shared
        if out_dir.exists():
            previous = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, previous / out_dir.name)
            os.replace(staging, out_dir)
            shutil.rmtree(previous)
        else:
            os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def load_timm_backbone(folder: str | Path) -> torch.nn.Module:
    """Rebuild an exported backbone with plain timm, exactly as a downstream user would; eval mode.

    Equivalent to ``timm.create_model(f"local-dir:{folder}", pretrained=True)``. The whole saved
    pretrained_cfg (with ``num_classes=0``) is overlaid, not only ``file``: with the architecture's
    default cfg (``num_classes=1000``) timm sees a classifier mismatch and loads non-strictly, so a
    missing tensor would silently stay randomly initialised. Overlaid, it is an error.
    """
    folder = Path(folder)
    config = json.loads((folder / CONFIG_FILE).read_text())
    overlay = {**config.get("pretrained_cfg", {}), "file": str(folder / WEIGHTS_FILE), "num_classes": 0}
    model = timm.create_model(config["architecture"], pretrained=True, pretrained_cfg_overlay=overlay,
                              num_classes=0, **config.get("model_args", {}))
    return model.eval()


def save_mlflow_model(folder: str | Path, path: str | Path, mlflow_model: Model | None = None) -> Path:
    """Write the export ``folder`` as an MLflow model at ``path``: the backbone plain timm builds from
    it, in MLflow's pytorch flavour, whose pyfunc ``predict`` maps an image batch to embeddings;
    with a signature and input example at the export's input size (float32 ``(-1, C, H, W)`` ->
    ``(-1, num_features)``), pip requirements, and the folder's config.json + model.safetensors at
    its root, so plain timm loads the very same folder.

    Pickled, not ``torch.export``-ed (MLflow's default): ``mlflow.pytorch.load_model`` then gives the
    timm module itself (trainable, with its ``forward_features`` etc.), for every architecture,
    without an export step that can fail at the end of a long run. ``mlflow_model`` carries the
    run and logged-model ids into the MLmodel file.
    """
    folder, path = Path(folder), Path(path)
    backbone = load_timm_backbone(folder)
    input_size = json.loads((folder / CONFIG_FILE).read_text())["pretrained_cfg"]["input_size"]
    # The normalised mean image: shows the shape and dtype a caller sends (and stays small as JSON).
    example = np.zeros((1, *input_size), dtype=np.float32)
    with torch.no_grad():
        features = backbone(torch.from_numpy(example)).numpy()
    mlflow.pytorch.save_model(
        backbone, path, mlflow_model=mlflow_model, signature=infer_signature(example, features),
        input_example=example, serialization_format="pickle",
        # given, not inferred: inference re-imports the model in a subprocess (seconds)
        pip_requirements=[*mlflow.pytorch.get_default_pip_requirements(), f"timm=={timm.__version__}"])
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        shutil.copy2(folder / name, path / name)
    return path


def _is_mlflow_ref(ref: str) -> bool:
    return ref.startswith(("models:/", "runs:/"))


def registry_listing(client, name: str) -> str:
    """What the registry holds under ``name`` (or which names it has), for error messages."""
    try:
        model = client.get_registered_model(name)
    except MlflowException:
        names = sorted(m.name for m in client.search_registered_models(max_results=100))
        return f"no registered model '{name}'; registered models: {', '.join(names) or 'none'}"
    versions = sorted(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
    aliases = ", ".join(f"@{alias} -> {version}" for alias, version in sorted(model.aliases.items()))
    return (f"registered model '{name}' has versions {', '.join(map(str, versions)) or 'none'} "
            f"and aliases {aliases or 'none'}")


def _model_version(client, ref: str):
    """The registry's ModelVersion behind ``models:/<name>/<version>`` or ``models:/<name>@<alias>``."""
    spec = ref.removeprefix("models:/").rstrip("/")
    name, at, alias = spec.partition("@")
    if not at:
        name, _, version = spec.partition("/")
        if not version.isdigit():
            raise FileNotFoundError(f"backbone '{ref}': expected models:/<name>/<version> or "
                                    f"models:/<name>@<alias>; {registry_listing(client, name)}")
    try:
        if at:
            return client.get_model_version_by_alias(name, alias)
        return client.get_model_version(name, version)
    except MlflowException as err:
        raise FileNotFoundError(f"backbone '{ref}' not found in MLflow registry {client.tracking_uri}: "
                                f"{registry_listing(client, name)}") from err


def _logged_model_location(client, run_id: str, name: str) -> str | None:
    """Where the run's logged model ``name`` (``runs:/<run_id>/<name>``) keeps its files; None if the
    run has no such model (its ``name`` is then a plain artifact folder, as runs logged before the
    backbone became an MLflow model have). Looked up with ``client``: MLflow 3.17 resolves the
    logged models of ``runs:/`` URIs in the *global* tracking URI."""
    try:
        experiment_id = client.get_run(run_id).info.experiment_id
    except MlflowException as err:
        raise FileNotFoundError(f"backbone 'runs:/{run_id}/{name}': no run {run_id} in MLflow store "
                                f"{client.tracking_uri} ({err.message})") from err
    models = client.search_logged_models(
        [experiment_id], filter_string=f"source_run_id = '{run_id}' AND name = '{name}'")
    return models[0].artifact_location if models else None


@dataclass(frozen=True)
class BackboneSource:
    """A resolved backbone reference: the local export folder, and where it came from (lineage:
    the registered model version and the pretraining run, where the reference tells them)."""

    ref: str
    folder: Path
    model_name: str | None = None
    model_version: str | None = None
    pretrain_run_id: str | None = None

    @property
    def config(self) -> dict[str, Any]:
        return json.loads((self.folder / CONFIG_FILE).read_text())


def _is_run_id(ref: str) -> bool:
    """A bare MLflow run id (32 hex digits) that is not also a local folder."""
    return len(ref) == 32 and all(c in "0123456789abcdef" for c in ref) and not Path(ref).exists()


def export_digest(folder: str | Path) -> str:
    """sha256 over an export's config.json and weights: identifies the backbone's content wherever
    it was downloaded to (feature cache keys, lineage tags)."""
    digest = hashlib.sha256()
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        with open(Path(folder) / name, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


class BackboneInputError(ValueError):
    """The backbone cannot take the images the config would feed it; the message says what it takes."""


def check_input_size(backbone: torch.nn.Module, source: BackboneSource, image_size: int) -> None:
    """Fail before any data is read if ``backbone`` refuses ``image_size`` px images (e.g. a ViT
    with a fixed patch grid), naming the size it was exported for and the key to change."""
    exported = source.config.get("pretrained_cfg", {}).get("input_size")
    try:
        with torch.no_grad():
            backbone(torch.zeros(1, 3, image_size, image_size))
    except (RuntimeError, AssertionError, ValueError) as err:
        raise BackboneInputError(
            f"backbone '{source.ref}' ({source.config.get('architecture')}) does not take 3x{image_size}x{image_size} "
            f"images (data.eval_image_size={image_size}); it was exported for input_size {exported}: set "
            f"data.eval_image_size={exported[-1] if exported else '<its size>'}. ({err})") from None


def download_once(source: str, tracking_uri: str) -> Path:
    """The artifacts at ``source`` (a model version's or run's, which MLflow never changes) in
    ``$XDG_CACHE_HOME/ssl-foundry/backbones/`` (``~/.cache`` without XDG_CACHE_HOME): downloaded
    on first use into a staging folder renamed into place, so a repeated evaluation downloads
    nothing and concurrent ranks or jobs never see half a download."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ssl-foundry" / "backbones"
    final = cache / hashlib.sha256(f"{tracking_uri} {source}".encode()).hexdigest()[:24]
    if final.is_dir():
        return final
    cache.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=cache))
    try:
        mlflow.artifacts.download_artifacts(artifact_uri=source, tracking_uri=tracking_uri, dst_path=str(staging))
        # MLflow puts a directory artifact under its own name inside dst_path.
        entries = list(staging.iterdir())
        downloaded = entries[0] if len(entries) == 1 and entries[0].is_dir() else staging
        try:
            downloaded.rename(final)
        except OSError:
            if not final.is_dir():  # not another process's finished copy: a real error
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def resolve_backbone(ref: str, tracking_uri: str | None = None) -> Path:
    """The local export folder of a backbone reference (see ``locate_backbone``)."""
    return locate_backbone(ref, tracking_uri).folder


def locate_backbone(ref: str, tracking_uri: str | None = None) -> BackboneSource:
    """Turn a backbone reference into a local export folder (containing config.json) and its lineage.

    ``ref`` is ``models:/<name>/<version>``, ``models:/<name>@<alias>``, ``runs:/<run_id>/backbone``
    or a bare run id (its ``backbone`` artifact), downloaded from the MLflow store ``tracking_uri``
    (which is also the registry; ``None``: MLflow's configured URI), or a local export folder. A
    reference that does not resolve raises ``FileNotFoundError`` naming it and what exists instead.
    Downloads are kept in the user's cache (``download_once``): treat the result as read-only.

    The pretraining run is the model version's run, the run of a ``runs:/`` reference, or what the
    export's config.json recorded (``ssl_foundry.mlflow_run_id``) for a local folder.

    Registry names are resolved here with an explicit client: in MLflow 3.17,
    ``mlflow.artifacts.download_artifacts(artifact_uri="models:/...", tracking_uri=uri)`` looks the
    name up in the *global* registry URI, not in ``uri``. (A downstream user who sets
    ``MLFLOW_TRACKING_URI`` or calls ``mlflow.set_tracking_uri`` gets the right store.)
    """
    if _is_run_id(ref):
        ref = f"runs:/{ref}/backbone"
    if not _is_mlflow_ref(ref):
        folder = Path(ref)
        if not (folder / CONFIG_FILE).is_file():
            what = "has no config.json" if folder.is_dir() else "does not exist"
            raise FileNotFoundError(
                f"backbone '{ref}' {what}: expected an export folder (config.json + {WEIGHTS_FILE}, "
                f"written by export_timm_backbone), a run id, or an MLflow reference models:/<name>/<version>, "
                f"models:/<name>@<alias> or runs:/<run_id>/backbone.")
        recorded = json.loads((folder / CONFIG_FILE).read_text()).get("ssl_foundry", {})
        return BackboneSource(ref, folder, pretrain_run_id=recorded.get("mlflow_run_id"))

    if tracking_uri:
        check_store_exists(tracking_uri)
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    if ref.startswith("models:/"):
        version = _model_version(client, ref)
        lineage = dict(model_name=version.name, model_version=str(version.version), pretrain_run_id=version.run_id)
        source = client.get_model_version_download_uri(version.name, version.version)
    else:
        run_id, _, name = ref.removeprefix("runs:/").partition("/")
        lineage = dict(pretrain_run_id=run_id)
        source = _logged_model_location(client, run_id, name.rstrip("/")) or ref
    try:
        local = download_once(source, client.tracking_uri)
    except MlflowException as err:
        raise FileNotFoundError(f"backbone '{ref}' could not be downloaded from {source} "
                                f"(MLflow store {client.tracking_uri}): {err.message}") from err
    if not (local / CONFIG_FILE).is_file():
        found = f"files: {sorted(os.listdir(local))}" if local.is_dir() else "a single file"
        raise FileNotFoundError(f"backbone '{ref}' downloaded to {local} but it has no {CONFIG_FILE}: "
                                f"it is not a backbone export ({found}).")
    return BackboneSource(ref, local, **lineage)
