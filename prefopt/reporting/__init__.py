"""Reporting: run directories (or a W&B group) read into records (`runs`), tables and plots over them
(`report`, `plots`), the DCR study's table (`dcr`) and a W&B dashboard (`dashboard`)."""
