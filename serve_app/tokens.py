"""Make API tokens for the QA service.

    python -m serve_app.tokens new [--append FILE]   # a new token and its SHA-256 hash
    python -m serve_app.tokens hash < token.txt       # the hash of an existing token

Give the token to the client (it is shown once, store it in the client's secret store); give the
service only the hash: a line of the file passed as --token-hashes-file, or an entry of the
QA_TOKEN_HASHES environment variable (a Kubernetes Secret on a cluster).
"""

import argparse
import secrets
import sys
from pathlib import Path

from serve_app.auth import TOKEN_ID_CHARS, hash_token


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m serve_app.tokens", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    new = commands.add_parser("new", help="make a new random token and print it with its hash")
    new.add_argument("--append", metavar="FILE", help="also append the hash to this token hashes file")
    commands.add_parser("hash", help="print the hash of the token read from standard input")
    flags = parser.parse_args(argv)

    if flags.command == "hash":
        token = sys.stdin.read().strip()
        if not token:
            sys.exit("error: no token on standard input")
        print(hash_token(token))
        return
    token = secrets.token_urlsafe(32)  # 256 random bits
    digest = hash_token(token)
    if flags.append:
        with Path(flags.append).expanduser().open("a", encoding="utf-8") as hashes:
            hashes.write(digest + "\n")
    print(f"token:    {token}")
    print(f"sha256:   {digest}")
    print(f"token id: {digest[:TOKEN_ID_CHARS]}  (how the audit log names this token)")
    print(
        "Give the token to the client (send it as `Authorization: Bearer TOKEN`); give the service only the "
        "hash" + (f" (appended to {flags.append})." if flags.append else "."),
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
