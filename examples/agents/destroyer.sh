#!/bin/sh
# A fake agent gone rogue: deletes everything it can in the guest,
# `rm -rf /*` style. The VM is reverted afterwards, so the next test
# starts from a clean guest.
echo "destroying the guest"
rm -rf /* 2>/dev/null
# Only shell builtins work from here on: /bin is gone.
if [ -e /bin/ls ]; then echo "/bin/ls survived"; else echo "/bin/ls is gone"; fi
exit 0
