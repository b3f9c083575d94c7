"""Ray Tune sweeps of training configs: sweep files (`sweep`), trials that are Ray Train runs
(`trial`), the Tuner and its restoration (`runner`), and the summary a sweep leaves (`report`)."""
