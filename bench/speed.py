"""The speed benchmark as a script: `python bench/speed.py [options]` is `nanolstm bench [options]`.

`python bench/speed.py --help` lists the options; the results go to bench/results/speed.json.
"""

import sys

from nanolstm.bench import main

if __name__ == "__main__":
    sys.exit(main())
