#!/bin/sh
# A deterministic fake agent that edits the fixture repository
# (tests/fixtures/repo of the example suite): modifies README.md, deletes
# obsolete.txt and creates a directory with a file in it.
set -eu

if [ ! -f README.md ] || [ ! -f obsolete.txt ]; then
    echo "editor.sh: run me on the fixture repository" >&2
    exit 1
fi
sed -i 's/^Status: draft$/Status: reviewed/' README.md
echo "- checked by editor.sh" >>README.md
rm obsolete.txt
mkdir -p notes
printf 'todo: nothing left\n' >notes/todo.txt
echo "edited README.md, removed obsolete.txt, created notes/todo.txt"
