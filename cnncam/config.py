"""The one parameter schema: typed, frozen dataclasses loaded from YAML.

``load_config("configs/demo.yaml", ["train.epochs=5"])`` reads the file with
``yaml.safe_load``, applies dotted overrides, and validates every key and value
against the dataclass field types *before* any work starts.  An unknown key or
a bad value raises :class:`ConfigError` naming the dotted key, the valid keys or
choices, and the closest match.

Names here are the names everywhere: the same strings appear on the command
line, in HDF5 group names and in the report (``gradcam_pp``, never ``gradcam++``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from cnncam.errors import ConfigError, choice_message
from cnncam.typed_config import apply_override, from_dict, to_dict
from cnncam.typed_config import valid_keys as _valid_keys

Precision = Literal["fp32", "bf16", "fp16"]
# The registered models (cnncam.models.MODELS); model.name also takes the three external forms.
REGISTERED_MODELS = (
    "simple_cnn",
    "resnet18",
    "resnet34",
    "resnet50",
    "mobilenet_v2",
    "vgg16",
    "efficientnet_b0",
)
MODEL_FORMS = ("torchvision:<builder>", "timm:<name>", "python:<module>:<callable>")
ModelName = str  # a registered name or one of MODEL_FORMS, checked by check_model_name
_MODEL_FORM = re.compile(
    r"^(torchvision:[A-Za-z_]\w*|timm:[A-Za-z0-9_][\w.-]*|python:[A-Za-z_][\w.]*:[A-Za-z_][\w.]*)$"
)
CamMethod = Literal[
    "gradcam", "gradcam_pp", "xgradcam", "layercam", "hirescam", "scorecam", "eigencam", "cam"
]
Split = Literal["train", "val", "test"]
TARGET_PATTERN = re.compile(r"^(pred|label|all|class:\d+|topk:[1-9]\d*)$")
TARGET_CHOICES = "pred, label, all, class:<i>, topk:<k>"
# Largest data.image_size: a batch of 64 such float images is 12 GiB before the first layer.
MAX_IMAGE_SIZE = 4096
# Total downsampling of the torchvision models: a smaller input vanishes before the head.
_DOWNSAMPLING = {
    name: 32 for name in ("resnet18", "resnet34", "resnet50", "mobilenet_v2", "vgg16", "efficientnet_b0")
}


@dataclass(frozen=True)
class SplitConfig:
    """Fractions for splitting a single image folder (ignored for presplit data)."""

    train: float = 0.8
    val: float = 0.1
    test: float = 0.1

    def __post_init__(self) -> None:
        for name in ("train", "val", "test"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"data.split.{name} must be within [0, 1], got {getattr(self, name)}")
        if self.train <= 0:
            raise ConfigError("data.split.train must be > 0")
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ConfigError(
                f"data.split ratios must sum to 1, got {total:g} ({self.train}+{self.val}+{self.test})"
            )


@dataclass(frozen=True)
class DataConfig:
    root: str = "data/shapes"
    # auto: use root/train, root/val, root/test when root/train exists, else split root.
    layout: Literal["auto", "presplit", "single"] = "auto"
    split: SplitConfig = field(default_factory=SplitConfig)
    image_size: int = 64
    # Eval transform: resize the short side to `resize`, then center-crop image_size.
    # None means round(image_size * 8 / 7), torchvision's usual 224/256 ratio.
    resize: int | None = None
    augment: Literal["none", "basic", "full"] = "basic"
    crop_scale: tuple[float, float] = (0.6, 1.0)
    hflip: float = 0.5
    vflip: float = 0.0
    rotation: float = 15.0
    color_jitter: float = 0.2
    translate: float = 0.1
    zoom: float = 0.1
    normalize: Literal["imagenet", "dataset", "none"] = "imagenet"
    batch_size: int = 64
    eval_batch_size: int | None = None
    num_workers: int = 2
    pin_memory: bool = True
    persistent_workers: bool = True
    extensions: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
    # Images with more pixels are refused as decompression bombs (PIL's default limit).
    max_image_pixels: int = 89_478_485
    # How data.root is laid out: class folders, a CSV manifest (data.manifest) or WebDataset tar
    # shards ({key}.jpg|png + {key}.cls); see cnncam/data/layouts.py.
    format: Literal["folder", "csv", "webdataset"] = "folder"
    manifest: str = "manifest.csv"  # format=csv: `path,label[,split]`, relative to data.root or absolute
    # Sanity check (data randomisation, Adebayo et al. 2018): train on the train split's labels
    # shuffled among its images with a fixed seed.  Saved splits and val/test keep the true labels.
    permute_labels: bool = False

    def __post_init__(self) -> None:
        _positive("data.image_size", self.image_size)
        _positive("data.batch_size", self.batch_size)
        if self.image_size > MAX_IMAGE_SIZE:
            raise ConfigError(
                f"data.image_size {self.image_size} is larger than {MAX_IMAGE_SIZE}, the largest supported "
                f"size (64 such images take {64 * 3 * 4 * self.image_size**2 / 2**30:.0f} GiB as float32)"
            )
        if self.resize is not None and self.resize < self.image_size:
            raise ConfigError(f"data.resize ({self.resize}) must be >= data.image_size ({self.image_size})")
        if self.resize is not None and self.resize > 2 * MAX_IMAGE_SIZE:
            raise ConfigError(
                f"data.resize {self.resize} is larger than {2 * MAX_IMAGE_SIZE}, the largest supported"
            )
        if self.eval_batch_size is not None:
            _positive("data.eval_batch_size", self.eval_batch_size)
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {self.num_workers}")
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ConfigError(f"data.crop_scale must satisfy 0 < lo <= hi <= 1, got {self.crop_scale}")
        for name in ("hflip", "vflip"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"data.{name} is a probability in [0, 1], got {getattr(self, name)}")
        # torchvision's own ValueErrors would not name the config key.
        for key, value, lo, hi in [
            ("rotation", self.rotation, 0.0, 180.0),
            ("translate", self.translate, 0.0, 1.0),
            ("zoom", self.zoom, 0.0, 0.999),
            ("color_jitter", self.color_jitter, 0.0, 1.0),
        ]:
            if not lo <= value <= hi:
                raise ConfigError(f"data.{key} must be within [{lo:g}, {hi:g}], got {value}")

    @property
    def eval_resize(self) -> int:
        return self.resize if self.resize is not None else round(self.image_size * 8 / 7)


def check_model_name(name: str) -> str:
    """``name`` if it is a registered model or one of :data:`MODEL_FORMS`; else :class:`ConfigError`."""
    if name in REGISTERED_MODELS or _MODEL_FORM.match(name):
        return name
    raise ConfigError(
        "model.name: "
        + choice_message("value", name, REGISTERED_MODELS)
        + f"; or one of the forms {', '.join(MODEL_FORMS)} (e.g. torchvision:convnext_tiny, "
        "timm:vit_tiny_patch16_224, python:mymodels:build)"
    )


@dataclass(frozen=True)
class ModelConfig:
    name: ModelName = "simple_cnn"
    # Local weights file (.pt/.pth state dict or .safetensors) to start training from; the head is
    # replaced when its size differs.  Nothing is ever downloaded.
    pretrained: str | None = None
    freeze_backbone: bool = False
    # simple_cnn only: output channels of each conv-BN-ReLU-pool block.
    channels: tuple[int, ...] = (32, 64, 128)
    convs_per_block: int = 1
    # simple_cnn only: hidden units of an extra Linear-ReLU-Dropout before the classifier (0 = none).
    hidden: int = 0
    dropout: float = 0.3
    # Keyword arguments of a torchvision:/timm:/python: builder, e.g. {img_size: 32} for a timm ViT.
    kwargs: dict[str, Any] = field(default_factory=dict)
    # Final weights of a model trained elsewhere (an export-only run: `cam --model ... --weights`).
    weights: str | None = None
    # The input normalisation the model expects (e.g. timm's data config); None = data.normalize.
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    # simple_cnn only: gap = global average pooling (any input size, CAM fast path); flatten = the
    # seeds' Flatten -> Dense over a flatten_grid x flatten_grid pooled map (the classifier sees layout).
    head: Literal["gap", "flatten"] = "gap"
    flatten_grid: int = 4
    # simple_cnn only: max-pool after the last block too; false keeps its resolution (finer CAMs).
    last_pool: bool = True

    def __post_init__(self) -> None:
        check_model_name(self.name)
        if not all(isinstance(k, str) and k.isidentifier() for k in self.kwargs):
            raise ConfigError(f"model.kwargs keys must be argument names, got {list(self.kwargs)}")
        if (self.mean is None) != (self.std is None) or (self.std is not None and min(self.std) <= 0):
            raise ConfigError(f"model.mean and model.std go together (std > 0), got {self.mean} / {self.std}")
        if not self.channels or any(c <= 0 for c in self.channels):
            raise ConfigError(
                f"model.channels must be a non-empty list of positive ints, got {self.channels}"
            )
        _positive("model.convs_per_block", self.convs_per_block)
        if self.hidden < 0:
            raise ConfigError(f"model.hidden must be >= 0, got {self.hidden}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout}")
        _positive("model.flatten_grid", self.flatten_grid)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.01
    momentum: float = 0.9
    scheduler: Literal["none", "cosine", "step", "plateau"] = "cosine"
    warmup_epochs: float = 0.0
    step_size: int = 10
    gamma: float = 0.1
    plateau_patience: int = 2
    plateau_factor: float = 0.5
    min_lr: float = 0.0
    label_smoothing: float = 0.0
    grad_clip: float | None = None
    # The metric that picks best.pt and drives early stopping / the plateau scheduler.
    monitor: Literal["val_loss", "val_accuracy"] = "val_accuracy"
    patience: int = 0  # early-stopping patience in epochs; 0 disables early stopping
    min_delta: float = 0.0
    precision: Precision = "fp32"
    channels_last: bool = False
    compile: bool = False
    # The device of training, the CAM export and the sanity checks (auto: a GPU when one is visible).
    device: Literal["auto", "cpu", "cuda"] = "auto"
    log_every: int = 10  # iterations between metrics.jsonl lines
    sync_bn: bool = True  # convert BatchNorm to SyncBatchNorm under DDP on GPUs (CUDA only)
    # cuDNN benchmark off + torch.use_deterministic_algorithms: bit-identical GPU resume, slower.
    deterministic: bool = False

    def __post_init__(self) -> None:
        _positive("train.epochs", self.epochs)
        _positive("train.lr", self.lr)
        _positive("train.log_every", self.log_every)
        _positive("train.step_size", self.step_size)
        if self.weight_decay < 0 or self.warmup_epochs < 0 or self.patience < 0:
            raise ConfigError("train.weight_decay, train.warmup_epochs and train.patience must be >= 0")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"train.label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ConfigError(f"train.grad_clip must be > 0 or null, got {self.grad_clip}")


@dataclass(frozen=True)
class CamConfig:
    split: Split = "test"
    checkpoint: str = "best"  # best | last | a path to a .pt file
    methods: tuple[CamMethod, ...] = ("gradcam",)
    layers: tuple[str, ...] = ("auto",)
    targets: str = "pred"
    batch_size: int = 64
    num_workers: int = 2
    precision: Precision = "fp32"
    metrics: bool = False  # deletion/insertion AUC, pointing game
    metric_steps: int = 16
    activations: tuple[str, ...] = ()  # layer names whose activations are recorded
    activation_images: int = 16  # record activations for the first N images of each shard
    activation_channels: int | None = None  # first K channels; None = all
    upsampled: bool = False  # also store maps upsampled to the input size
    out: str | None = None  # default: runs/<name>/cams
    queue_size: int = 4  # batches waiting for the HDF5 writer thread
    # GAP + linear heads: gradient maps from the head weights, no backward (checked vs autograd).
    fast_path: bool = True
    relu: bool = True  # ReLU on the maps (the papers' convention); false keeps signed maps
    deletion_baseline: Literal["zero", "blur"] = "zero"  # what deleted pixels become (cam.metrics)
    durable: bool = True  # fsync the part file after every batch; false: faster, a crash may redo it
    # Faithfulness (issue 11): ROAD scores and the batching of the metrics' forwards.
    road: bool = False  # ROAD MoRF/LeRF per image (Rong et al., ICML 2022); noisy linear imputation
    road_percentiles: tuple[int, ...] = (10, 20, 30, 40, 50, 60, 70, 80, 90)
    road_noise: float = 0.01  # std of the noise added to imputed pixels (the paper's value)
    metric_batch_size: int | None = None  # perturbed images per metric forward; None = cam.batch_size
    # merge: copy the parts into one physical cams.h5 (auto: above storage.merge.CONSOLIDATE_ABOVE parts)
    consolidate: Literal["auto", "always", "never"] = "auto"

    def __post_init__(self) -> None:
        if not TARGET_PATTERN.match(self.targets):
            raise ConfigError(f"cam.targets {self.targets!r} is invalid. Valid choices: {TARGET_CHOICES}")
        if not self.methods:
            raise ConfigError("cam.methods must name at least one method")
        if not self.layers:
            raise ConfigError("cam.layers must name at least one layer (or 'auto')")
        _positive("cam.batch_size", self.batch_size)
        _positive("cam.metric_steps", self.metric_steps)
        _positive("cam.queue_size", self.queue_size)
        if self.metric_batch_size is not None:
            _positive("cam.metric_batch_size", self.metric_batch_size)
        if not self.road_percentiles or any(not 0 < p < 100 for p in self.road_percentiles):
            raise ConfigError(f"cam.road_percentiles must lie in (0, 100), got {list(self.road_percentiles)}")
        if self.road_noise < 0:
            raise ConfigError(f"cam.road_noise must be >= 0, got {self.road_noise}")


@dataclass(frozen=True)
class ReportConfig:
    alpha: float = 0.5  # heatmap opacity in the overlay panel
    colormap: str = "jet"
    gallery_size: int = 6  # images per gallery (confident right/wrong, least confident)
    per_class: int = 3  # images per class in the per-class gallery
    max_channels: int = 32  # feature-map channels (and first-layer filters) shown per layer
    images_per_row: int = 16  # columns of the feature-map / filter grids (the seeds' layout)
    compare_size: int = 4  # images in the side-by-side method/layer comparison
    # Per-class galleries and mean maps for at most this many classes (the lowest recall first).
    max_classes: int = 50
    dpi: int = 100  # resolution of the PNG figures

    def __post_init__(self) -> None:
        if not 0 <= self.alpha <= 1:
            raise ConfigError(f"report.alpha must be in [0, 1], got {self.alpha}")
        for name in ("gallery_size", "per_class", "compare_size"):
            if getattr(self, name) < 0:
                raise ConfigError(f"report.{name} must be >= 0, got {getattr(self, name)}")
        _positive("report.max_channels", self.max_channels)
        _positive("report.max_classes", self.max_classes)
        _positive("report.images_per_row", self.images_per_row)
        if not 20 <= self.dpi <= 600:
            raise ConfigError(f"report.dpi must be within [20, 600], got {self.dpi}")


SanityMode = Literal["cascading", "independent"]
SANITY_TARGETS = re.compile(r"^(pred|label|class:\d+)$")


@dataclass(frozen=True)
class SanityConfig:
    """``launch.py sanity``: the model- and data-randomisation tests (cnncam.cam.sanity)."""

    images: int = 64  # fixed, seeded sample of the split
    split: Split | None = None  # None = cam.split
    methods: tuple[CamMethod, ...] = ()  # empty = cam.methods
    modes: tuple[SanityMode, ...] = ("cascading", "independent")
    targets: str = "pred"  # pred (of the trained model) | label | class:<i>; fixed for every model
    seed: int = 0  # sample and per-unit random weights
    examples: int = 3  # images whose maps the report shows at every step
    batch_size: int = 64  # images per CAM engine call
    # Flag a method whose mean similarity after `flag_depth` cascading steps is still >= threshold.
    flag_metric: Literal["ssim", "spearman_abs", "spearman"] = "ssim"
    flag_depth: int = 2
    flag_threshold: float = 0.5

    def __post_init__(self) -> None:
        _positive("sanity.images", self.images)
        _positive("sanity.batch_size", self.batch_size)
        _positive("sanity.flag_depth", self.flag_depth)
        if not self.modes:
            raise ConfigError(
                "sanity.modes must name at least one mode. Valid choices: cascading, independent"
            )
        if not SANITY_TARGETS.match(self.targets):
            raise ConfigError(
                f"sanity.targets {self.targets!r} is invalid. Valid choices: pred, label, class:<i>"
            )
        if self.examples < 0:
            raise ConfigError(f"sanity.examples must be >= 0, got {self.examples}")
        if not -1 <= self.flag_threshold <= 1:
            raise ConfigError(f"sanity.flag_threshold must be within [-1, 1], got {self.flag_threshold}")


@dataclass(frozen=True)
class SlurmConfig:
    executor: Literal["auto", "slurm", "local", "inline"] = "auto"
    partition: str | None = None
    # Partition for the CPU-only steps (CAM merge, report); None = `partition`.
    cpu_partition: str | None = None
    nodes: int = 1
    gpus_per_node: int = 1
    # Training tasks per node; None = one per GPU (1 without GPUs).  DDP on CPU: 2 with gpus_per_node=0.
    tasks_per_node: int | None = None
    cpus_per_task: int = 4
    mem_gb: float | None = None
    time_min: int = 60
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    job_name: str | None = None  # prefix of every job name; None = cnncam-<run name>
    array_parallelism: int = 32
    extra_sbatch: tuple[str, ...] = ()  # e.g. ["--exclusive", "--reservation=foo"]
    setup: tuple[str, ...] = ()  # shell lines run before the job: module load, source venv
    signal_delay_s: int = 120  # USR2 this long before the time limit, to checkpoint
    max_requeues: int = 10
    # Jobs import cnncam from a snapshot of the package taken at submission (<run>/code/<digest>/),
    # not from the checkout as it is when they start; false: from the checkout (as before).
    snapshot_code: bool = True

    def __post_init__(self) -> None:
        _positive("slurm.nodes", self.nodes)
        _positive("slurm.cpus_per_task", self.cpus_per_task)
        _positive("slurm.time_min", self.time_min)
        _positive("slurm.array_parallelism", self.array_parallelism)
        if self.gpus_per_node < 0:
            raise ConfigError(f"slurm.gpus_per_node must be >= 0, got {self.gpus_per_node}")
        if self.tasks_per_node is not None:
            _positive("slurm.tasks_per_node", self.tasks_per_node)
        if self.mem_gb is not None:
            _positive("slurm.mem_gb", self.mem_gb)
        if self.max_requeues < 0:
            raise ConfigError(f"slurm.max_requeues must be >= 0, got {self.max_requeues}")
        if not 0 <= self.signal_delay_s < self.time_min * 60:
            raise ConfigError(
                f"slurm.signal_delay_s ({self.signal_delay_s}) must be >= 0 and shorter than the time limit "
                f"(slurm.time_min={self.time_min} -> {self.time_min * 60} s)"
            )
        # Names, extra sbatch options and setup lines end up in a shell script: checked there
        # (imported here, lazily, because cnncam.launch imports this module).
        from cnncam.launch.params import check_sbatch_safety

        check_sbatch_safety(self)


@dataclass(frozen=True)
class RunConfig:
    name: str = "run"
    runs_dir: str = "runs"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    cam: CamConfig = field(default_factory=CamConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    sanity: SanityConfig = field(default_factory=SanityConfig)

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.name):
            raise ConfigError(
                f"name {self.name!r} must be letters, digits, '_', '.', '-' (it names a folder)"
            )
        need, what = min_image_size(self.model)
        if self.data.image_size < need:
            raise ConfigError(
                f"data.image_size {self.data.image_size} is too small for {what}: it needs at least {need} px"
            )

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.name


def _positive(key: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(f"{key} must be > 0, got {value}")


def min_image_size(model: ModelConfig) -> tuple[int, str]:
    """The smallest input the model can take and why: each stride-2 stage halves the image."""
    if model.name == "simple_cnn":
        n = len(model.channels)
        return 2**n, f"simple_cnn with {n} blocks (each block halves the image)"
    factor = _DOWNSAMPLING.get(model.name, 1)
    return factor, f"{model.name} (it downsamples {factor}x)"


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load`` that refuses a key given twice in one mapping (PyYAML keeps the last
    silently, so a second ``train:`` section would replace the first).  Merge keys (``<<``)
    may still be overridden, as YAML intends."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                seen = key in first
            except TypeError:  # an unhashable key: the base class reports it
                continue
            line = key_node.start_mark.line + 1
            if seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key {key!r} at line {line} (first at line {first[key]})",
                    key_node.start_mark,
                )
            first[key] = line
        return super().construct_mapping(node, deep)


def load_yaml(path: Path, what: str = "config file") -> Any:
    """A YAML file with safe types only and unique keys; errors as one line naming the file."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{what} {str(path)!r} is a folder, not a YAML file")
    if not path.is_file():
        raise ConfigError(f"{what} {str(path)!r} does not exist")
    try:
        return yaml.load(path.read_text(), Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = e.problem or str(e)
        if "duplicate key" in problem:
            at = ""
        raise ConfigError(f"{what} {str(path)!r} is not valid YAML: {problem}{at}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{what} {str(path)!r} is not valid YAML: {' '.join(str(e).split())}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a YAML config, apply ``key.path=value`` overrides, validate everything."""
    raw: dict[str, Any] = {}
    if path is not None:
        loaded = load_yaml(Path(path))
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level")
        raw = loaded or {}
    for item in overrides:
        apply_override(RunConfig, raw, item)
    return from_dict(RunConfig, raw)


def dump_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def valid_keys(cls: type = RunConfig, prefix: str = "") -> list[str]:
    """Every dotted key of the schema, for ``--help`` and error messages."""
    return _valid_keys(cls, prefix)
