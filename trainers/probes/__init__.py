"""Linear probes read from views (`probe`, `config`, `data`, `logreg`) and the probe monitor
(`monitor`) that writes their scores back into the store."""
