"""The `cityserve` command, a thin top layer: it parses, calls the packages below, formats and
exits (`cli`, with `platform_cli` and `cluster_cli` for the platform's and Kubernetes' groups,
`console` for tables and one-line errors). Nothing imports it."""
