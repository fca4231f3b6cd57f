PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONFIG ?= config.yaml

.PHONY: run test bench lint check-config fuzz clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/tailgate run --config $(CONFIG)

check-config: $(STAMP)
	$(BIN)/tailgate check-config --config $(CONFIG)

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check sampler policies tests benchmarks
	$(BIN)/ruff format --check sampler policies tests benchmarks
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py

# Coverage-guided fuzzing of each decoder with atheris, FUZZ_TIME seconds each (not part of `test`).
FUZZ_TIME ?= 60
FUZZ_TARGETS := protobuf json zipkin_json zipkin_proto3

fuzz: $(STAMP)
	@$(BIN)/python -c 'import atheris' 2>/dev/null || $(BIN)/pip install --quiet atheris || { \
		echo "make fuzz: cannot install atheris: no wheel for this platform and no clang/libFuzzer to build one." >&2; \
		echo "The Hypothesis fuzz tests (tests/fuzz, part of 'make test') do not need it." >&2; exit 1; }
	@for target in $(FUZZ_TARGETS); do \
		echo "== fuzzing $$target for $(FUZZ_TIME)s"; \
		$(BIN)/python tests/fuzz/atheris_targets.py $$target -max_total_time=$(FUZZ_TIME) -max_len=65536 || exit 1; \
	done

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
