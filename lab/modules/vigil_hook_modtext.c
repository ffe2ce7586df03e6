// SPDX-License-Identifier: GPL-2.0
/* Lab attack: the inline hook again, as a module of another name, so that a
 * test can hook module text and kernel text in the same guest. */
#include "vigil_hook_inline.c"
