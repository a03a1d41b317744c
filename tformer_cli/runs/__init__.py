"""Run directories: their files, finding and loading them (`--model`), choosing where a new run
goes, and the lock that keeps one writer per run."""
