.PHONY: quality style test docs

# Run from the repository root with the project's environment active (pip install -e ".[test,dev]").
check_dirs := prefopt tests scripts

# Lint, formatting and types, checked without changing anything (what CI runs).
quality:
	ruff check $(check_dirs)
	ruff format --check $(check_dirs)
	mypy

# Format the code and apply ruff's safe fixes.
style:
	ruff format $(check_dirs)
	ruff check --fix $(check_dirs)

# The default test selection of pyproject.toml (not slow, gpu or slurm).
test:
	python -m pytest

# The documentation site; --strict fails on a broken link.
docs:
	mkdocs build --strict
