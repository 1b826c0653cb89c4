"""Local evaluation: frozen specs, scorers, statistics, the runner, reports and the gate."""
