"""ddk: offline two-stage knowledge distillation (DDK, arXiv 2407.16154).

corpus -> domains -> teacher top-k -> shards -> scheduler/sampler -> student -> eval
"""
__version__ = "0.1.0"
