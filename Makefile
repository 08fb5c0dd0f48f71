# Two commands for a newcomer: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# The CPU build of torch: from the local wheel cache when this machine has one, else from
# PyTorch's CPU index. A plain `pip install torch` would pull several GB of CUDA packages.
TORCH_WHEEL := $(firstword $(wildcard /opt/wheels/torch-2.13.0+cpu-*.whl))
TORCH_SRC   := $(if $(TORCH_WHEEL),$(TORCH_WHEEL),torch==2.13.0+cpu --index-url https://download.pytorch.org/whl/cpu --extra-index-url https://pypi.org/simple)
DEMO_OUT    ?= demo-out

.PHONY: demo demo-images test lint test-arm64 test-arch test-install arch-site venv bench-deps clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_SRC) numpy
	$(PY) -c "import torch, sys; sys.exit('a CUDA build of torch is installed; remove .venv' if torch.version.cuda else 0)"
	$(PY) -m pip install -q -c constraints.txt -e '.[all,dev]'
	touch $(STAMP)

demo: $(STAMP)
	mkdir -p $(DEMO_OUT)
	$(PY) -m compress.zoo.shapes data --calib $(DEMO_OUT)/calib.npz --eval $(DEMO_OUT)/eval.npz
	$(VENV)/bin/compress run compress.zoo:shapes_resnet --calib $(DEMO_OUT)/calib.npz --eval $(DEMO_OUT)/eval.npz \
		--device host --prune 0.25 --allocation measured --tolerance 0.01 -o $(DEMO_OUT)/run
	@echo "demo report: $(abspath $(DEMO_OUT))/run/report.md (and report.json, tradeoff.png, one .onnx per variant)"

# The same demo from folders of PNG files (calibration: DIR/*.png; labelled: DIR/CLASS/*.png), as a user's photos
# would be: the pre-processing comes from the model's pretrained_cfg, as it does for timm models.
demo-images: $(STAMP)
	mkdir -p $(DEMO_OUT)
	test -d $(DEMO_OUT)/calib-images || $(PY) -m compress.zoo.shapes images --calib $(DEMO_OUT)/calib-images
	test -d $(DEMO_OUT)/eval-images || $(PY) -m compress.zoo.shapes images --eval $(DEMO_OUT)/eval-images
	$(VENV)/bin/compress run compress.zoo:shapes_resnet --calib $(DEMO_OUT)/calib-images --eval $(DEMO_OUT)/eval-images \
		--device host --prune 0.25 --allocation measured --tolerance 0.01 -o $(DEMO_OUT)/run-images
	@echo "demo report: $(abspath $(DEMO_OUT))/run-images/report.md"

bench-deps: $(STAMP)
	$(PY) -m pip install -q -c constraints.txt -e '.[bench]'

# House rules: ruff (unused names, syntax, no private name from another package), import-linter's contracts in
# pyproject.toml (layers point one way, no cycles), tools/house_rules.py (no private name across modules).
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports
	$(PY) tools/house_rules.py

test: lint
	$(PY) -m pytest -q -m "not arm64 and not arch and not install"

# The device-side runner on aarch64 Linux under qemu user-mode emulation (needs qemu-user-static; the first run
# fetches an arm64 Python from Debian and aarch64 wheels from PyPI into ~/.cache/edge-compress/arm64, ~205 MB).
test-arm64: $(STAMP)
	$(PY) tools/arm64_sysroot.py
	$(PY) -m pytest -q -m arm64

# The architecture suite (issue 19): timm's edge families and ultralytics' YOLO through `compress run`, one model
# per test (tests/test_arch.py, ~20 minutes on 2 cores). timm, ultralytics and torchvision go into a folder of
# their own rather than the venv: the registry's only torchvision for torch 2.13 is a CUDA build, which breaks
# transformers' vision imports when installed beside it (bench/arch_models.py declares the two op schemas its
# Python code needs). ~235 MB.
ARCH_SITE := $(abspath $(VENV))/arch-site
ARCH_PKGS := timm==1.0.31 torchvision==0.28.0 ultralytics==8.4.190 ultralytics-thop==2.2.3 \
             opencv-python-headless==5.1.0.95 polars==2.1.0

arch-site: $(ARCH_SITE)/.installed

$(ARCH_SITE)/.installed: $(STAMP)
	$(PY) -m pip install -q --no-deps --target $(ARCH_SITE) $(ARCH_PKGS)
	touch $@

test-arch: $(ARCH_SITE)/.installed
	EDGE_COMPRESS_ARCH_SITE=$(ARCH_SITE) $(PY) -m pytest -q -m arch

# The core install (issue 20): a fresh venv with only `pip install .` profiles and names the extras it lacks.
test-install: $(STAMP)
	$(PY) -m pytest -q -m install

clean:
	rm -rf $(VENV) $(DEMO_OUT)
