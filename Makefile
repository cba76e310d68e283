PYTHON ?= python3

.PHONY: install demo test

install:
	$(PYTHON) -m pip install -q -r requirements.txt

demo: install
	$(PYTHON) -m vistune demo

test: install
	$(PYTHON) -m pytest -q
