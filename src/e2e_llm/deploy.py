# SPDX-License-Identifier: Apache-2.0
"""Typed deployment settings (``configs/deploy.yaml``) for the Anyscale and KubeRay targets.

The file names the pipeline profile it deploys and adds only what rendering needs beyond the
profile: image repositories and tags, node selectors per accelerator, pod sizes the profile
does not state, shared storage, secret *names*, job retry/TTL policy and the canary upgrade
options. Everything is strict (``extra="forbid"``); derived values (the Ray version from the
image tag, worker counts and GPUs from the profile) are computed here, never typed twice.

Usage:
    deploy = load_deploy(root=project_root())
    config = deploy.pipeline()          # the PipelineConfig of deploy.profile
    deploy.images.serve.ray_version     # "2.60.0", from the tag
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from e2e_llm.config import (
    ConfigError,
    PipelineConfig,
    RootedFile,
    Strict,
    load_profile,
    load_yaml_model,
    project_root,
)
from e2e_llm.validate_common import DNS1035

DEPLOY_FILE = Path("configs/deploy.yaml")
# <ray X.Y.Z>-py<NNN>-<platform>[-aarch64][-<content id>]: rayproject's
# {version}-{python}-{platform}[-{architecture}] tag scheme, where only aarch64 images name their
# machine (no suffix: x86_64); deploy.yaml names the base part, the content id is appended at render time.
IMAGE_TAG = re.compile(
    r"^(?P<ray>\d+\.\d+\.\d+)-py(?P<py>\d{2,3})-(?P<platform>cpu|cu\d{3}|gpu)(?:-(?P<arch>aarch64))?"
    r"(?:-(?P<release>[\w.]+))?$"
)
# The machine an image tag is built for -> Kubernetes' kubernetes.io/arch label; one entry per
# machine the locks are made for (e2e_llm.lock_platforms.MACHINES).
KUBERNETES_ARCH = {"x86_64": "amd64", "aarch64": "arm64"}
# Node labels the pods' machine sets (from the image tags): an accelerator's selector must not.
NODE_PLATFORM_LABELS = ("kubernetes.io/arch", "kubernetes.io/os")
QUANTITY = re.compile(r"^\d+(\.\d+)?(Ki|Mi|Gi|Ti|k|M|G|T)?$")
SUBMISSION_MODES = ("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode")


def reference_tag(image: str) -> str:
    """The tag of an image reference (``registry:5000/repo:tag@sha256:...`` -> ``tag``; '' if none)."""
    return image.rsplit("/", 1)[-1].partition("@")[0].partition(":")[2]


def tag_machine(tag: str) -> str | None:
    """The machine an image tag (base or content-addressed) is built for; None if not our scheme."""
    m = IMAGE_TAG.match(tag)
    return (m["arch"] or "x86_64") if m else None


class ImageRef(Strict):
    repository: str
    tag: str

    @field_validator("repository")
    @classmethod
    def _no_tag_in_repository(cls, value: str) -> str:
        if "@" in value or ":" in value.rsplit("/", 1)[-1]:
            raise ValueError("repository must not carry a tag or digest; put the tag in `tag`")
        return value

    @field_validator("tag")
    @classmethod
    def _base_tag(cls, value: str) -> str:
        m = IMAGE_TAG.match(value)
        if not m or m["release"]:
            raise ValueError(
                f"tag {value!r} must look like <ray X.Y.Z>-py<NNN>-<cpu|cuNNN|gpu>[-aarch64] "
                "(e.g. 2.60.0-py311-cu128): the content id of the image is appended at render time "
                "(e2e_llm.images), never typed; `latest` and bare versions are not pinned")
        return value

    def content_tag(self, root: Path, containerfile: str, platform: str | None = None) -> str:
        """``<tag>-<content id>`` for the image built from ``containerfile`` (platform: replace
        the tag's platform part, e.g. ``cpu`` for the CPU variant of the serve image)."""
        from e2e_llm.images import image_identity

        base = self.tag
        if platform:
            m = IMAGE_TAG.match(base)
            base = f"{m['ray']}-py{m['py']}-{platform}" + (f"-{m['arch']}" if m["arch"] else "")
        return image_identity(root, containerfile).tag(base)

    @property
    def ray_version(self) -> str:
        """The Ray version the image carries, read from its tag (KubeRay ``rayVersion``)."""
        return IMAGE_TAG.match(self.tag)["ray"]

    @property
    def python_tag(self) -> str:
        return "py" + IMAGE_TAG.match(self.tag)["py"]

    @property
    def machine(self) -> str:
        """x86_64 or aarch64: what the image runs on (the tag's architecture part)."""
        return tag_machine(self.tag)

    @property
    def kubernetes_arch(self) -> str:
        """The ``kubernetes.io/arch`` of the nodes the image can run on."""
        return KUBERNETES_ARCH[self.machine]


class Images(Strict):
    train: ImageRef
    serve: ImageRef
    pull_policy: Literal["IfNotPresent", "Always"] = "IfNotPresent"


class Accelerator(Strict):
    node_selector: dict[str, str] = Field(min_length=1)
    anyscale: str  # accelerator resource name in Anyscale compute configs

    @field_validator("node_selector")
    @classmethod
    def _no_platform_labels(cls, value: dict[str, str]) -> dict[str, str]:
        if taken := sorted(set(value) & set(NODE_PLATFORM_LABELS)):
            raise ValueError(f"{', '.join(taken)}: every pod selects these from its image's tag (an aarch64 "
                             "image is <ray>-py<NNN>-<platform>-aarch64); leave them out here")
        return value


class PodSize(Strict):
    cpu: int | None = Field(None, ge=1)  # None: taken from the profile
    memory: str
    shm: str | None = None  # size of the /dev/shm memory volume (NCCL, vLLM)

    @field_validator("memory", "shm")
    @classmethod
    def _quantity(cls, value: str | None) -> str | None:
        if value is not None and not QUANTITY.match(value):
            raise ValueError(f"{value!r} is not a Kubernetes quantity (e.g. 32Gi)")
        return value


class Compute(Strict):
    head: PodSize
    train_worker: PodSize
    batch_worker: PodSize
    serve_worker: PodSize

    @model_validator(mode="after")
    def _cpus_known(self) -> Compute:
        for name in ("head", "batch_worker", "serve_worker"):
            if getattr(self, name).cpu is None:
                raise ValueError(f"{name}.cpu is required (only train_worker takes CPUs from the profile)")
        return self


class Volume(Strict):
    claim_name: str
    size: str
    access_mode: Literal["ReadWriteMany", "ReadWriteOnce", "ReadOnlyMany", "ReadWriteOncePod"] = "ReadWriteMany"
    storage_class: str | None = None  # None: the cluster's default class

    @field_validator("size")
    @classmethod
    def _quantity(cls, value: str) -> str:
        if not QUANTITY.match(value):
            raise ValueError(f"{value!r} is not a Kubernetes quantity (e.g. 500Gi)")
        return value


class Storage(Strict):
    volume: Volume
    mount_path: str = "/mnt/cluster_storage"


class SecretKeyRef(Strict):
    name: str
    key: str


class SecretRef(Strict):
    name: str


class RegistrySecret(Strict):
    """Credentials for the private registry the images are pushed to, by name on each target."""
    kubernetes: str | None = None  # a kubernetes.io/dockerconfigjson Secret: imagePullSecrets of every Ray pod
    anyscale: str | None = None    # Anyscale registry_login_secret: the cloud secret manager entry


class Secrets(Strict):
    hf_token: SecretKeyRef
    aws: SecretRef
    api_key: SecretKeyRef
    registry: RegistrySecret = RegistrySecret()


class JobStage(Strict):
    args: list[str] = Field(default_factory=list)


class Jobs(Strict):
    max_retries: int = Field(2, ge=0)
    timeout_s: int = Field(86400, gt=0)
    # RayJob preRunningDeadlineSeconds: a job not running by then (a pod that cannot be scheduled,
    # pulled or admitted) fails and frees its nodes, instead of holding them until timeout_s.
    start_timeout_s: int = Field(3600, gt=0)
    ttl_seconds_after_finished: int = Field(3600, ge=0)
    submission_mode: Literal[SUBMISSION_MODES] = "K8sJobMode"  # type: ignore[valid-type]
    train: JobStage = JobStage()
    batch: JobStage = JobStage()

    @model_validator(mode="after")
    def _starts_within_timeout(self) -> Jobs:
        if self.start_timeout_s >= self.timeout_s:
            raise ValueError(f"start_timeout_s ({self.start_timeout_s}) must be less than timeout_s "
                             f"({self.timeout_s}): the job's whole run includes its start")
        return self


class Canary(Strict):
    step_size_percent: int = Field(ge=1, le=100)
    interval_seconds: int = Field(gt=0)
    max_surge_percent: int = Field(100, ge=0, le=100)
    gateway_class_name: str = Field(min_length=1)

    @model_validator(mode="after")
    def _step_within_surge(self) -> Canary:
        if self.step_size_percent > self.max_surge_percent:
            raise ValueError(f"step_size_percent ({self.step_size_percent}) must be <= max_surge_percent "
                             f"({self.max_surge_percent}): a step cannot shift more traffic than the surge capacity")
        return self


class Service(Strict):
    # Anyscale's own bearer token in front of the service (the SDK's default is True too).
    query_auth_token_enabled: bool = True
    canary: Canary


class AnyscaleSettings(Strict):
    cloud: str | None = None
    project: str | None = None


class DeployConfig(RootedFile):
    profile: str
    name: str
    images: Images
    accelerators: dict[str, Accelerator] = Field(default_factory=dict)
    compute: Compute
    storage: Storage
    secrets: Secrets
    jobs: Jobs = Jobs()
    service: Service
    anyscale: AnyscaleSettings = AnyscaleSettings()

    @field_validator("name")
    @classmethod
    def _dns_label(cls, value: str) -> str:
        if not DNS1035.match(value) or len(value) > 40:
            raise ValueError("name must be a DNS-1035 label of at most 40 characters (it prefixes object names)")
        return value

    def external_objects(self) -> set[tuple[str, str]]:
        """(kind, name) of the objects the manifests reference but this repository never
        creates: the Secrets named in ``secrets`` (the one list of external objects)."""
        names = [self.secrets.hf_token.name, self.secrets.aws.name, self.secrets.api_key.name,
                 self.secrets.registry.kubernetes]
        return {("Secret", name) for name in names if name}

    def image(self, name: str) -> ImageRef:
        """The base image of ``name`` (train, serve or serve-cpu: the serve one)."""
        return self.images.train if name == "train" else self.images.serve

    def image_ref(self, name: str) -> str:
        """The content-addressed reference of image ``name`` (train, serve or serve-cpu), as
        every rendered manifest names it: ``<repository>:<base tag>-<content id>``."""
        from e2e_llm.images import CONTAINERFILES

        image = self.image(name)
        tag = image.content_tag(self._root, CONTAINERFILES[name], "cpu" if name == "serve-cpu" else None)
        return f"{image.repository}:{tag}"

    def pipeline(self) -> PipelineConfig:
        """The deployed profile, checked against this file (every accelerator it uses is mapped)."""
        config = load_profile(self.profile, root=self._root)
        used = {
            "train.accelerator_type": config.train.accelerator_type,
            "batch.accelerator_type": config.batch.accelerator_type,
            "serve.accelerator_type": config.serve.accelerator_type,
        }
        if config.serve.auth.enabled and not self.service.query_auth_token_enabled:
            raise ConfigError(
                f"{self._source}: service.query_auth_token_enabled: false would leave the Anyscale service "
                f"open: profile {self.profile} serve.auth.enabled, but ${config.serve.auth.api_key_env} is not "
                "passed to Anyscale (the query token and the app key would both read `Authorization: Bearer`), "
                "so there the query token is the one auth layer; set it to true")
        for field, accelerator in used.items():
            if accelerator and accelerator not in self.accelerators:
                raise ConfigError(
                    f"{self._source}: accelerators: no entry for {accelerator!r} (profile {self.profile} "
                    f"{field}); known: {', '.join(sorted(self.accelerators)) or 'none'}")
        return config


def load_deploy(path: str | Path | None = None, root: Path | None = None) -> DeployConfig:
    """Load ``configs/deploy.yaml`` (or ``path``); relative paths resolve against the root."""
    root = (root or project_root()).resolve()
    path = Path(path) if path else root / DEPLOY_FILE
    deploy = load_yaml_model(DeployConfig, path)
    deploy._root = root
    deploy._source = path
    return deploy
