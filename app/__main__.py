"""``python -m app configs/app.yaml [--key value ...]`` — see app/main.py."""

from app.main import main

main()
