"""``python -m radixserve`` == the ``radixserve`` console script."""
from radixserve.cli import main

raise SystemExit(main())
