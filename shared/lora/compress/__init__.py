"""Joint compression of LoRA adapters (Compress then Serve): shared bases per cluster of adapters
(`jd`, `cluster`), the resumable run with an error budget and tenant groups (`run`), the store
on disk (`store`)."""

from pice.shared.lora.compress.run import CompressConfig, Source, compress

__all__ = ["CompressConfig", "Source", "compress"]
