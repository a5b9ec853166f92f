"""`python -m edge_agent.export ...` is `fedslim-agent export ...`."""

from edge_agent.export.cli import export_main

raise SystemExit(export_main())
