from .core import *
from .utils import *