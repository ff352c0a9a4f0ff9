"""Memory: what a stage held at its peak (`measure`) and what a run's stages will hold, planned from the models'
configs and the settings before anything loads (`plan`)."""
