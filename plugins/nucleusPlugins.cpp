/*
 * Library entry points of libnucleus_trt_plugins.so, the two symbols IPluginRegistry::loadLibrary() looks up
 * (trt.get_plugin_registry().load_library(path), trtexec --dynamicPlugins=path):
 *   getCreators     the IPluginCreatorV3One creators: ExpertChoiceRouter and MoECombine (namespace "nucleus", v1)
 *   setLoggerFinder the logger the plugins report errors through
 */
#include "common/pluginUtils.h"
#include "expertChoiceRouterPlugin/expertChoiceRouterPlugin.h"
#include "moeCombinePlugin/moeCombinePlugin.h"

#include <NvInferRuntime.h>

namespace
{
nucleus::plugin::ExpertChoiceRouterPluginCreator gRouterCreator;
nucleus::plugin::MoECombinePluginCreator gCombineCreator;
nvinfer1::IPluginCreatorInterface* const gCreators[] = {&gRouterCreator, &gCombineCreator};
} // namespace

extern "C" NUCLEUS_KERNEL_API void setLoggerFinder(nvinfer1::ILoggerFinder* finder)
{
    nucleus::plugin::setLoggerFinder(finder);
}

extern "C" NUCLEUS_KERNEL_API nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators)
{
    nbCreators = static_cast<int32_t>(sizeof(gCreators) / sizeof(gCreators[0]));
    return gCreators;
}
