// SPDX-License-Identifier: GPL-2.0
/* Lab attack: vigil_going under another name, so that one guest can hold a
 * module that turns live again and one that stays "unloading". */
#include "vigil_going.c"
