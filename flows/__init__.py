"""Prefect 3 flows over surfdiff_core: rss -> train -> sample -> relax, chained by discovery_flow."""
