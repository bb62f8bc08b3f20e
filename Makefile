# The two commands of the README: `make run` (the main job) and `make test` (everything CI runs).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell $(PY) -c 'import hashlib,sys;print(hashlib.sha256(open("pyproject.toml","rb").read()).hexdigest()[:12])')

.PHONY: run test lint typecheck unit bench rpm dist clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev,server]'
	@sh tools/ensure-tools.sh
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/qubes-mcp demo --serve

lint: $(STAMP)
	$(BIN)/ruff check src tests bench tools
	$(BIN)/ruff format --check src tests bench tools
	$(BIN)/python tools/check_imports.py
	$(BIN)/python tools/gen_operations.py --check
	$(BIN)/python tools/gen_tools_doc.py --check
	$(BIN)/python tools/gen_config_doc.py --check

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/python -m pytest -q

test: lint typecheck unit

bench: $(STAMP)
	$(BIN)/python -m bench

# the dom0 RPM (packaging/rpm/), into dist/
rpm: $(STAMP)
	$(BIN)/python tools/build_rpm.py --out dist

# the wheel and sdist for the control qube (`pipx install dist/qubes_mcp-*.whl'[server]'`)
dist: $(STAMP)
	rm -f dist/qubes_mcp-*.whl dist/qubes_mcp-*.tar.gz
	$(BIN)/python -m pip install -q build
	$(BIN)/python -m build --outdir dist .

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
