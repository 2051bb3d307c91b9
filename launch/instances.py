"""The GPU instance catalog the launcher knows: GPU model, count, memory, vCPU, RAM and price per hour.

    python -m launch.instances            # print the catalog as a table

Prices are EC2 On-Demand Linux list prices in us-east-1 in USD per hour, as published on the AWS
EC2 pricing pages in 2024 (before AWS's June 2025 price cuts of up to ~45% on P4d/P4de/P5, so those
three are upper bounds today). They are estimates for planning, not quotes: SageMaker's `ml.*` price
for the same machine is higher (roughly 1.15-1.4x), spot is usually 50-70% lower, and other regions
differ. Specs are from the public instance-type pages (GPU memory per GPU, RAM in GiB, local NVMe instance storage
in GB). Every type here has NVMe instance storage: SageMaker trains on it (the volume size setting is ignored and a
volume KMS key is refused for such types), and it is the disk a Kubernetes node of that type can give pods.
"""

from __future__ import annotations

import difflib
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class GpuInstance:
    name: str  # EC2 name; SageMaker uses "ml." + name
    gpu_model: str
    gpu_count: int
    gpu_memory_gib: int  # per GPU
    vcpus: int
    ram_gib: int
    price_per_hour_usd: float  # EC2 on-demand, us-east-1 (see the module docstring)
    bf16: bool  # Ampere and newer: bfloat16 compute (QLoRA's compute dtype)
    instance_store_gb: int = 0  # local NVMe storage in GB (decimal), all disks together; 0: none

    @property
    def has_instance_store(self) -> bool:
        return self.instance_store_gb > 0

    @property
    def sagemaker_type(self) -> str:
        return "ml." + self.name


def _family(prefix: str, gpu: str, mem: int, bf16: bool, rows: list[tuple[str, int, int, int, float, int]]):
    return {f"{prefix}.{size}": GpuInstance(f"{prefix}.{size}", gpu, n, mem, vcpu, ram, price, bf16, store)
            for size, n, vcpu, ram, price, store in rows}


# size, GPUs, vCPUs, RAM GiB, USD/hour, NVMe instance storage GB
INSTANCES: dict[str, GpuInstance] = {
    **_family("g5", "NVIDIA A10G", 24, True, [
        ("xlarge", 1, 4, 16, 1.006, 250), ("2xlarge", 1, 8, 32, 1.212, 450), ("4xlarge", 1, 16, 64, 1.624, 600),
        ("8xlarge", 1, 32, 128, 2.448, 900), ("16xlarge", 1, 64, 256, 4.096, 1900),
        ("12xlarge", 4, 48, 192, 5.672, 3800), ("24xlarge", 4, 96, 384, 8.144, 3800),
        ("48xlarge", 8, 192, 768, 16.288, 7600),
    ]),
    **_family("g6", "NVIDIA L4", 24, True, [
        ("xlarge", 1, 4, 16, 0.8048, 250), ("2xlarge", 1, 8, 32, 0.9776, 450), ("4xlarge", 1, 16, 64, 1.3232, 600),
        ("8xlarge", 1, 32, 128, 2.0144, 900), ("16xlarge", 1, 64, 256, 3.3968, 1880),
        ("12xlarge", 4, 48, 192, 4.6016, 3760), ("24xlarge", 4, 96, 384, 6.6752, 3760),
        ("48xlarge", 8, 192, 768, 13.3504, 7520),
    ]),
    **_family("g6e", "NVIDIA L40S", 48, True, [
        ("xlarge", 1, 4, 32, 1.861, 250), ("2xlarge", 1, 8, 64, 2.242, 450), ("4xlarge", 1, 16, 128, 3.004, 600),
        ("8xlarge", 1, 32, 256, 4.529, 900), ("16xlarge", 1, 64, 512, 7.577, 1900),
        ("12xlarge", 4, 48, 384, 10.493, 3800), ("24xlarge", 4, 96, 768, 15.066, 3800),
        ("48xlarge", 8, 192, 1536, 30.131, 7600),
    ]),
    **_family("p4d", "NVIDIA A100 40GB", 40, True, [("24xlarge", 8, 96, 1152, 32.7726, 8000)]),
    **_family("p4de", "NVIDIA A100 80GB", 80, True, [("24xlarge", 8, 96, 1152, 40.9657, 8000)]),
    **_family("p5", "NVIDIA H100", 80, True, [("48xlarge", 8, 192, 2048, 98.32, 30720)]),
}


def normalize(name: str) -> str:
    """Accept the SageMaker spelling too: ml.g5.2xlarge -> g5.2xlarge."""
    name = name.strip().lower()
    return name[3:] if name.startswith("ml.") else name


def lookup(name: str) -> GpuInstance:
    """The catalog entry, or ValueError naming the close matches."""
    key = normalize(name)
    if key in INSTANCES:
        return INSTANCES[key]
    close = difflib.get_close_matches(key, list(INSTANCES), n=5, cutoff=0.6)
    family = key.split(".")[0]
    same_family = [n for n in INSTANCES if n.split(".")[0] == family and n not in close]
    hint = close + same_family[: max(0, 5 - len(close))]
    suggestion = f" Close matches: {', '.join(hint)}." if hint else ""
    raise ValueError(f"--instance {name!r} is not in the catalog.{suggestion}"
                     " See `python -m launch.instances` for every known type.")


def table() -> str:
    rows = [f"{'instance':<15} {'GPU':<17} {'GPUs':>4} {'GiB/GPU':>7} {'vCPU':>5} {'RAM GiB':>7} {'NVMe GB':>7}"
            f" {'USD/h':>8}"]
    for inst in INSTANCES.values():
        rows.append(f"{inst.name:<15} {inst.gpu_model:<17} {inst.gpu_count:>4} {inst.gpu_memory_gib:>7}"
                    f" {inst.vcpus:>5} {inst.ram_gib:>7} {inst.instance_store_gb:>7} {inst.price_per_hour_usd:>8.3f}")
    rows.append("USD/h: EC2 on-demand us-east-1 list prices (2024), estimates; SageMaker ml.* costs more.")
    rows.append("NVMe GB: local instance storage, SageMaker's training disk on these types (the volume size is ignored).")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
    sys.exit(0)
