#!/bin/sh
# A fake agent whose output and file name are HTML: the report must show them
# as text and run nothing (`cargo xtask report-check` loads the report in a
# real browser). It also prints ANSI colours, which the report renders.
set -eu
echo '<script>alert(1)</script>'
printf '\033[1;32mok\033[0m: colours \033[31mred\033[0m and \033[38;5;33mblue\033[0m\n'
echo '<img src=x onerror=alert(1)> in stderr' >&2
printf 'pwned?\n' >'<img src=x onerror=alert(1)>'
