"""`python -m spdf`, `accelerate launch -m spdf …` and `torchrun -m spdf …` all land here."""
import sys

from .cli import main

sys.exit(main())
