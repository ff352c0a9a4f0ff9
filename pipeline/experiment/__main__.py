"""`python -m pipeline.experiment EXPERIMENT.toml`: an experiment in-process, without Prefect."""

import sys

from pipeline.experiment.trials import main

sys.exit(main())
